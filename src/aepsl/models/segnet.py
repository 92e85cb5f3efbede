"""The PSL segmentation network: per-pixel (C+1)-way scores plus an image classification branch.

The VGG16 variant is DeepLab-LargeFOV (Chen et al. 2015), the network of the paper. All
variants have output stride 8 (`model.seg_output_stride=16` trades resolution for speed); the
classification branch (global average pooling + linear) reads the same features as the
per-pixel classifier, so it predicts nu from what segments.

Backbone weights are loaded by `build_trunk`, then the backbone is converted to output
stride 8: the conversion only changes strides, dilations and pooling, never parameter shapes,
so ImageNet and whole-model files load with the key mapping of backbones.py. VGG16's fc6/fc7
become LargeFOV's by decimation, as DeepLab initialised them (backbones.vgg16_fc_to_large_fov),
when the weights hold them (ImageNet's do); then only the (C+1)-way classifier and the
classification branch are new layers.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from aepsl.config import Config
from aepsl.errors import UserError
from aepsl.models.backbones import Normalise, backbone_spec, build_trunk
from aepsl.models.saved import agree, check_segnet_file, read_model_file


class SegNet(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        channels: int,
        num_classes: int,
        output_stride: int,
        normalise: nn.Module,
        head_pretrained: bool = False,
    ):
        super().__init__()
        self.output_stride = output_stride
        self.head_pretrained = head_pretrained  # fc6/fc7 from the weights file, not random
        self.normalise = normalise  # images arrive in [0, 1]
        self.input_size = 0  # larger images are reduced to sqrt(h x w) = it (0: never)
        self.input_min_side = 0  # ... and enlarged when their shorter side is below it
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Conv2d(channels, num_classes + 1, 1)
        self.class_branch = nn.Linear(channels, num_classes)
        # DeepLab's fc8 initialisation; the classification branch is a new last layer too.
        for layer in (self.classifier, self.class_branch):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers without pretrained weights, trained at train.new_layer_lr_mult x the base
        rate: the classifier and the classification branch, and the head (fc6/fc7) when it
        started random (weights=none, or a file without VGG16's fc6/fc7, or a backbone whose
        head has no pretrained source)."""
        head = [] if self.head_pretrained else list(self.head.parameters())
        return [*head, *self.classifier.parameters(), *self.class_branch.parameters()]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel logits (N, C+1, h, w) at the output stride, and class logits (N, C)."""
        features = self.head(self.backbone(self.normalise(images)))
        return self.classifier(features), self.class_branch(features.mean(dim=(2, 3)))


def input_scale(height: int, width: int, size: int = 0, min_side: int = 0) -> float:
    """The factor an image of height x width is scaled by before the segmentation network, in
    training and prediction alike: down to sqrt(height x width) = `size` when it is larger (0:
    never), then up so that its shorter side is at least `min_side` (0: never).

    Only down: enlarging 64 px images to 128 rather than to the 112 px crop cost 0.04-0.09 val
    mIoU in every run of docs/robustness.md's 64 px cell."""
    scale = min(1.0, size / math.sqrt(height * width)) if size else 1.0
    if min_side:
        scale = max(scale, min_side / min(height, width))
    return scale


def effective_stride(backbone: str, output_stride: int) -> int:
    """The output stride a backbone is built at: as asked, but the tiny net is always 8."""
    return backbone_spec(backbone).stride(output_stride)


def build_segnet(backbone: str, weights: str, num_classes: int, output_stride: int = 8) -> SegNet:
    """The segmentation network on `backbone`, initialised from `weights` ('imagenet', 'none'
    or a file, as for the CAM classifier): the backbone, and VGG16's fc6/fc7 decimated into
    LargeFOV's head when the weights hold them; classifiers are new. `output_stride` 8 is
    DeepLab-LargeFOV's; 16 keeps the backbone's last strided stage (about 4x cheaper for
    EfficientNet-Lite0, coarser scores). `tiny` is always 8."""
    spec = backbone_spec(backbone)
    output_stride = effective_stride(backbone, output_stride)
    trunk = build_trunk(backbone, weights, output_stride)
    normalise = Normalise(spec.mean, spec.std)
    return SegNet(
        trunk.features,
        trunk.head,
        trunk.head_channels,
        num_classes,
        output_stride,
        normalise,
        trunk.head_pretrained,
    )


def load_segnet(checkpoint: str | os.PathLike, config: Config | None = None) -> SegNet:
    """The network of `aepsl train`'s model.pt, built as the file says. A setting of `config`
    the user gave (model.backbone, model.seg_output_stride) that disagrees with the file is a
    one-line error; a file of earlier versions (a bare state dict) is built as `config` says."""
    settings, state = read_model_file(checkpoint)
    if settings is None:
        if "classifier.weight" not in state:
            raise UserError(f"{checkpoint}: not an aepsl segmentation checkpoint (model.pt)")
        if config is None:
            raise UserError(
                f"{checkpoint}: a model file of an earlier version, without its settings; "
                "give the config it was trained with"
            )
        backbone, stride = config.model.backbone, config.model.seg_output_stride
        num_classes = state["classifier.weight"].shape[0] - 1
        size = min_side = 0  # earlier versions predicted every image at its own size
    else:
        if settings.get("kind") != "segnet":
            raise UserError(
                f"{checkpoint}: not an aepsl segmentation checkpoint (model.pt); it holds a "
                f"{settings.get('kind')}"
            )
        check_segnet_file(checkpoint, settings, state)
        backbone, stride = settings["backbone"], settings["output_stride"]
        num_classes = settings["num_classes"]
        size = int(settings.get("input_size", 0))
        min_side = int(settings.get("input_min_side", 0))
        if config is not None:
            given = config.model.model_fields_set
            asked = {
                "model.backbone": config.model.backbone,
                "model.seg_output_stride": effective_stride(
                    config.model.backbone, config.model.seg_output_stride
                ),
            }
            saved = {"model.backbone": backbone, "model.seg_output_stride": stride}
            agree(checkpoint, saved, {k: v for k, v in asked.items() if k[6:] in given})
    model = build_segnet(backbone, "none", num_classes, stride)
    model.input_size, model.input_min_side = size, min_side
    model.class_names = settings.get("classes") if settings else None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise UserError(
            f"{checkpoint}: does not fit model.backbone={backbone} "
            f"({lines[1].strip() if len(lines) > 1 else exc})"
        ) from None
    return model
