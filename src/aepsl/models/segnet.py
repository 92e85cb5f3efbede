"""The PSL segmentation network: per-pixel (C+1)-way scores plus an image classification branch.

The VGG16 variant is DeepLab-LargeFOV (Chen et al. 2015), the network of the paper. All
variants have output stride 8 (`model.seg_output_stride=16` trades resolution for speed); the
classification branch (global average pooling + linear) reads the same features as the
per-pixel classifier, so it predicts nu from what segments.

Backbone weights are loaded by `build_backbone`, then the backbone is converted to output
stride 8: the conversion only changes strides, dilations and pooling, never parameter shapes,
so ImageNet and whole-model files load with the key mapping of backbones.py.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from aepsl.config import Config
from aepsl.errors import UserError
from aepsl.io import load_checkpoint
from aepsl.models.backbones import build_backbone, resnet_features
from aepsl.models.efficientnet import with_output_stride


class SegNet(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        channels: int,
        num_classes: int,
        output_stride: int = 8,
    ):
        super().__init__()
        self.output_stride = output_stride
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Conv2d(channels, num_classes + 1, 1)
        self.class_branch = nn.Linear(channels, num_classes)
        # DeepLab's fc8 initialisation; the classification branch is a new last layer too.
        for layer in (self.classifier, self.class_branch):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers without pretrained weights (head, classifier, classification branch),
        trained at 10x the base rate: DeepLab's fc6/fc7 started from subsampled VGG16 fc
        weights, ours start random, so they are new layers too."""
        return [
            *self.head.parameters(),
            *self.classifier.parameters(),
            *self.class_branch.parameters(),
        ]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel logits (N, C+1, h, w) at the output stride, and class logits (N, C)."""
        features = self.head(self.backbone(images))
        return self.classifier(features), self.class_branch(features.mean(dim=(2, 3)))


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


def _efficientnet_os8(features: nn.Module) -> nn.Module:
    """EfficientNet-Lite0 rebuilt with its last two strides as dilation; the weights carry
    over."""
    return with_output_stride(features, 8)


def _fc6(channels: int, dilation: int) -> list[nn.Module]:
    """LargeFOV's fc6: a 3x3 conv with 1024 channels (dilation 12 at output stride 8), ReLU,
    dropout 0.5."""
    return [
        nn.Conv2d(channels, 1024, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
    ]


def _large_fov_head(channels: int, dilation: int) -> nn.Sequential:
    """fc6 then fc7 (1x1, 1024 channels, ReLU, dropout 0.5)."""
    return nn.Sequential(
        *_fc6(channels, dilation),
        nn.Conv2d(1024, 1024, 1),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
    )


def _tiny_head(channels: int, dilation: int) -> nn.Sequential:
    del dilation  # the tiny net's field of view already spans the demo's small images
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))


def _dilated_head(channels: int, dilation: int) -> nn.Sequential:
    """fc6 alone on ResNet-50: a large field of view without ASPP."""
    return nn.Sequential(*_fc6(channels, dilation))


# backbone name -> (conversion to output stride 8, head factory, head output channels)
_VARIANTS = {
    "tiny": (lambda features: features, _tiny_head, 128),
    "vgg16": (_vgg16_os8, _large_fov_head, 1024),
    "resnet50": (_resnet_os8, _dilated_head, 1024),
    "resnet101": (_resnet_os8, _dilated_head, 1024),
    "efficientnet_lite0": (_efficientnet_os8, _dilated_head, 1024),
}
FC6_DILATION_AT_STRIDE_8 = 12  # LargeFOV's; scaled with the stride to keep the field of view


def to_output_stride_8(backbone: str, features: nn.Module) -> nn.Module:
    """`backbone`'s feature extractor converted to output stride 8 (weights kept)."""
    return _VARIANTS[backbone][0](features)


def build_segnet(backbone: str, weights: str, num_classes: int, output_stride: int = 8) -> SegNet:
    """The segmentation network on `backbone`, its backbone initialised from `weights`
    ('imagenet', 'none' or a file, as for the CAM classifier); head and classifiers are new.
    `output_stride` 8 is DeepLab-LargeFOV's; 16 keeps the backbone's last strided stage (about
    4x cheaper for EfficientNet-Lite0, coarser scores). `tiny` is always 8."""
    if backbone not in _VARIANTS:
        raise UserError(
            f"unknown segmentation backbone '{backbone}' (choose from {', '.join(_VARIANTS)})"
        )
    to_stride_8, make_head, channels = _VARIANTS[backbone]
    features, backbone_channels = build_backbone(backbone, weights)
    if backbone == "tiny" or output_stride == 8:
        features, output_stride = to_stride_8(features), 8
    head = make_head(backbone_channels, FC6_DILATION_AT_STRIDE_8 * 8 // output_stride)
    return SegNet(features, head, channels, num_classes, output_stride)


def load_segnet(config: Config, checkpoint: str | os.PathLike) -> SegNet:
    """The network of `aepsl train`'s model.pt, built as `config.model` says."""
    state = load_checkpoint(checkpoint)
    if "classifier.weight" not in state:
        raise UserError(f"{checkpoint}: not an aepsl segmentation checkpoint (model.pt)")
    model = build_segnet(
        config.model.backbone,
        "none",
        state["classifier.weight"].shape[0] - 1,
        config.model.seg_output_stride,
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise UserError(
            f"{checkpoint}: does not fit model.backbone={config.model.backbone} "
            f"({lines[1].strip() if len(lines) > 1 else exc})"
        ) from None
    return model
