"""The CAM classifier of adversarial erasing: backbone, extra layers, 1x1 class scores, global
average pooling. The 1x1 layer applied before pooling *is* the CAM, so one forward pass gives
every class's map (Zhou et al. 2016: GAP then linear equals linear then GAP).

The extra layers (`model.cam_head`):
- `conv`: one new 3x3 conv (512 channels, ReLU, dropout 0.2), fc6-fc8 removed.
- `largefov`: the paper's description, VGG16 whose fully connected layers fc6/fc7 become conv
  layers: the segmentation network's head on the same trunk (VGG16: DeepLab-LargeFOV's fc6 3x3
  dilated and fc7 1x1, 1024 channels, decimated from VGG16's fc6/fc7 when the weights hold them,
  so pretrained; other backbones: their segmentation head, random).
"""

from __future__ import annotations

import torch
from torch import nn

from aepsl.models.backbones import Normalise, backbone_spec, build_backbone, build_trunk

CAM_HEADS = ("conv", "largefov")


class CamClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        channels: int,
        num_classes: int,
        normalise: nn.Module,
        extra: nn.Module | None = None,
        extra_channels: int = 512,
        extra_pretrained: bool = False,
    ) -> None:
        """`extra`: the layers between backbone and CAM layer, `extra_channels` wide (None: the
        `conv` head, one new 3x3 conv); `extra_pretrained`: initialised from the weights file."""
        super().__init__()
        self.normalise = normalise  # images arrive in [0, 1]
        self.backbone = backbone
        if extra is None:
            extra = nn.Sequential(
                nn.Conv2d(channels, 512, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(0.2)
            )
            extra_channels, extra_pretrained = 512, False
        self.extra = extra
        self.extra_pretrained = extra_pretrained
        self.cam = nn.Conv2d(extra_channels, num_classes, 1, bias=False)

    def new_parameters(self) -> list[nn.Parameter]:
        """The CAM layer, and the extra layers unless they came from the weights file."""
        extra = [] if self.extra_pretrained else list(self.extra.parameters())
        return [*extra, *self.cam.parameters()]

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw per-class activation maps (N, C, h, w) before ReLU and upsampling."""
        return self.cam(self.extra(self.backbone(self.normalise(images))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-label logits (N, C)."""
        return self.class_maps(images).mean(dim=(2, 3))


def build_classifier(
    backbone: str,
    weights: str,
    num_classes: int,
    output_stride: int = 16,
    cam_head: str = "conv",
) -> CamClassifier:
    """The CAM classifier; `output_stride` 8 dilates the backbone's last strided stage (finer
    CAMs at more compute). `tiny` is always 8. `cam_head`: `conv` or `largefov` (module
    docstring); largefov's fc6 dilation is 12 at stride 8, 6 at 16 (the same field of view)."""
    spec = backbone_spec(backbone)
    stride = spec.stride(output_stride)
    normalise = Normalise(spec.mean, spec.std)
    if cam_head == "conv":
        net, channels = build_backbone(backbone, weights, output_stride)
        model = CamClassifier(net, channels, num_classes, normalise)
    elif cam_head == "largefov":
        trunk = build_trunk(backbone, weights, stride)
        model = CamClassifier(
            trunk.features,
            trunk.channels,
            num_classes,
            normalise,
            trunk.head,
            trunk.head_channels,
            trunk.head_pretrained,
        )
    else:
        raise ValueError(f"cam_head must be one of {CAM_HEADS}, not {cam_head!r}")
    model.output_stride = stride
    return model
