"""CAMs to regions, as pure functions on tensors: the rule shared by `mine` (its own CAMs),
`labels` (labels.cams_dir) and the threshold sweep.

Label-map encoding: 0 = nothing mined, k = class k mined, 255 = conflict (two or more classes
mined at that pixel).
"""

from __future__ import annotations

from typing import Literal

import torch

from aepsl.labelmap import CONFLICT

ThresholdMode = Literal["relative", "quantile"]


def threshold_regions(cams: torch.Tensor, mode: ThresholdMode, threshold: float) -> torch.Tensor:
    """Boolean regions R of (..., H, W) normalised CAMs.

    relative: pixels with H >= threshold (the top of the value range);
    quantile: the top `threshold` fraction of pixels of each map by value.
    Only positive activations can be mined, so an all-zero map yields no region.
    """
    positive = cams > 0
    if mode == "relative":
        return (cams >= threshold) & positive
    if mode == "quantile":
        if cams.numel() == 0:  # no classes (or no pixels): nothing to mine
            return positive
        flat = cams.flatten(-2).float()
        cut = torch.quantile(flat, 1.0 - threshold, dim=-1, keepdim=True)
        return (cams >= cut.unsqueeze(-1)) & positive
    raise ValueError(f"unknown threshold mode {mode!r}")


def regions_to_label_map(regions: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
    """(K, H, W) boolean regions of classes `class_ids` -> (H, W) uint8 label map."""
    count = regions.sum(dim=0)
    ids = torch.tensor(class_ids, dtype=torch.long, device=regions.device)
    winner = ids[regions.int().argmax(dim=0)] if len(class_ids) else torch.zeros_like(count)
    labels = torch.where(count == 1, winner, torch.zeros_like(winner))
    labels = torch.where(count > 1, torch.full_like(labels, CONFLICT), labels)
    return labels.to(torch.uint8)


def cams_to_regions(
    cams: torch.Tensor, class_ids: list[int], mode: ThresholdMode, threshold: float
) -> torch.Tensor:
    """(K, H, W) normalised CAMs of classes `class_ids` -> (H, W) uint8 region label map."""
    return regions_to_label_map(threshold_regions(cams, mode, threshold), class_ids)
