"""Pseudo-label fusion (docs/method.md, stage 2) as a pure function on arrays.

Rules: a pixel mined for one class c gets c; a conflict (mined for two classes) is ignored;
an unmined pixel whose saliency is below the background threshold is background; all else is
ignored (255). When a mined pixel has low saliency the paper does not say who wins:
`low_saliency="mined"` (default) keeps the class, `"background"` makes it background.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from aepsl.labelmap import CONFLICT, IGNORE

LowSaliency = Literal["mined", "background"]


def fuse_pseudo_label(
    regions: np.ndarray,
    background: np.ndarray,
    low_saliency: LowSaliency = "mined",
) -> np.ndarray:
    """`regions`: union label map (0 none, k class, 255 conflict); `background`: boolean map of
    pixels the saliency source calls background. Returns a uint8 map, 255 = ignore."""
    if regions.shape != background.shape:
        raise ValueError(f"regions {regions.shape} and background {background.shape} differ")
    mined = (regions != 0) & (regions != CONFLICT)
    labels = np.full(regions.shape, IGNORE, np.uint8)
    labels[mined] = regions[mined]
    if low_saliency == "background":
        labels[background] = 0
    else:
        labels[background & (regions == 0)] = 0
    return labels


def background_from_saliency(saliency: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose saliency (in [0, 1]) is below `threshold`."""
    return saliency < threshold


def background_from_cams(cams: np.ndarray, threshold: float) -> np.ndarray:
    """Saliency-free background: pixels where every present class's CAM (K, H, W) is below
    `threshold`."""
    if len(cams) == 0:
        return np.ones(cams.shape[-2:], bool)
    return (cams < threshold).all(axis=0)
