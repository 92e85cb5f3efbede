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
    """(K, H, W) boolean regions of classes `class_ids` (1..254) -> (H, W) uint8 label map."""
    # In uint8 throughout: where one class is mined its id is the maximum over the classes of
    # id x region (20x faster than an argmax at VOC's size on one core).
    count = regions.sum(dim=0, dtype=torch.uint8)
    if not len(class_ids):
        return count
    ids = torch.tensor(class_ids, dtype=torch.uint8, device=regions.device).view(-1, 1, 1)
    winner = (regions.to(torch.uint8) * ids).amax(dim=0)
    labels = torch.where(count == 1, winner, 0)
    return torch.where(count > 1, CONFLICT, labels).to(torch.uint8)


def cams_to_regions(
    cams: torch.Tensor, class_ids: list[int], mode: ThresholdMode, threshold: float
) -> torch.Tensor:
    """(K, H, W) normalised CAMs of classes `class_ids` -> (H, W) uint8 region label map."""
    return regions_to_label_map(threshold_regions(cams, mode, threshold), class_ids)
