"""The CAM classifier of adversarial erasing: backbone, extra conv, 1x1 class scores, global
average pooling. The 1x1 layer applied before pooling *is* the CAM, so one forward pass gives
every class's map (Zhou et al. 2016: GAP then linear equals linear then GAP)."""

from __future__ import annotations

import torch
from torch import nn

from aepsl.models.backbones import Normalise, backbone_spec, build_backbone


class CamClassifier(nn.Module):
    def __init__(
        self, backbone: nn.Module, channels: int, num_classes: int, normalise: nn.Module
    ) -> None:
        super().__init__()
        self.normalise = normalise  # images arrive in [0, 1]
        self.backbone = backbone
        # The paper replaces fc6-fc8 by extra conv layers before the CAM layer.
        self.extra = nn.Sequential(
            nn.Conv2d(channels, 512, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(0.2)
        )
        self.cam = nn.Conv2d(512, num_classes, 1, bias=False)

    def new_parameters(self) -> list[nn.Parameter]:
        return [*self.extra.parameters(), *self.cam.parameters()]

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw per-class activation maps (N, C, h, w) before ReLU and upsampling."""
        return self.cam(self.extra(self.backbone(self.normalise(images))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-label logits (N, C)."""
        return self.class_maps(images).mean(dim=(2, 3))


def build_classifier(
    backbone: str, weights: str, num_classes: int, output_stride: int = 16
) -> CamClassifier:
    """The CAM classifier; `output_stride` 8 dilates the backbone's last strided stage (finer
    CAMs at more compute). `tiny` is always 8."""
    spec = backbone_spec(backbone)
    net, channels = build_backbone(backbone, weights, output_stride)
    model = CamClassifier(net, channels, num_classes, Normalise(spec.mean, spec.std))
    model.output_stride = 8 if spec.native_stride == 8 else output_stride
    return model
