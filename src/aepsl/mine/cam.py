"""The algorithmic core of adversarial erasing, as pure functions on tensors.

Label-map encoding used throughout: 0 = nothing mined, k = class k mined, 255 = conflict
(two or more classes mined at that pixel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aepsl.labelmap import CONFLICT


def upsample_relu(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU of raw (N, K, h, w) class maps, bilinearly upsampled to `size`."""
    return F.interpolate(F.relu(maps.float()), size=size, mode="bilinear", align_corners=False)


def max_normalise(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide each (..., H, W) map by its max, giving [0, 1]; an all-zero map stays zero."""
    peak = maps.flatten(-2).amax(dim=-1)[..., None, None]
    return maps / peak.clamp(min=eps)


def normalise_cams(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CAMs as the paper uses them: ReLU, upsampled to image size, max-normalised to [0, 1]."""
    return max_normalise(upsample_relu(maps, size))


def union_label_maps(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Union of two label maps: a pixel mined for different classes, or already in conflict in
    either map, is a conflict; otherwise the class mined in either."""
    a, b = first.long(), second.long()
    merged = torch.where(a == 0, b, a)
    clash = (a == CONFLICT) | (b == CONFLICT) | ((a != 0) & (b != 0) & (a != b))
    return torch.where(clash, torch.full_like(merged, CONFLICT), merged).to(torch.uint8)


def fill_erased(images: torch.Tensor, erase: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Set the erased pixels of (N, 3, H, W) or (3, H, W) images to the `fill` colour (3,)."""
    return torch.where(erase.unsqueeze(-3), fill.to(images.dtype).reshape(3, 1, 1), images)
