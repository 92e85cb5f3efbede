"""Pseudo-label fusion (docs/method.md, stage 2) as a pure function on arrays.

Rules: a pixel mined for one class c gets c; a conflict (mined for two classes) is ignored;
an unmined pixel whose saliency is below the background threshold is background; all else is
ignored (255). When a mined pixel has low saliency the paper does not say who wins:
`low_saliency="mined"` (default) keeps the class, `"background"` makes it background.

Optionally (`labels.salient_fill`, not in the paper) a salient pixel left unlabelled takes the
tag whose CAM is highest there: `fill_from_cams`.

Optionally (`labels.crf`, not in the paper) a dense CRF then moves the label's edges to the
image's: `label_probabilities` is its unary, `merge_crf_label` what is kept of its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def fill_from_cams(
    labels: np.ndarray,
    cams: np.ndarray,
    tags: Sequence[int],
    background: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Unlabelled (255) pixels that are not `background` take the tag whose CAM is highest
    there, when that CAM reaches `threshold`; `cams` (K, H, W) in [0, 1], in the order of
    `tags`. Mined regions keep only each CAM's top, the salient rest of an object stays
    unlabelled: this gives it the class the CAMs favour."""
    if cams.shape != (len(tags), *labels.shape):
        raise ValueError(f"cams {cams.shape} do not match {len(tags)} tags and {labels.shape}")
    if len(tags) == 0:
        return labels
    winner = np.asarray(tags, np.uint8)[cams.argmax(axis=0)]
    fill = (labels == IGNORE) & ~background & (cams.max(axis=0) >= threshold)
    return np.where(fill, winner, labels).astype(np.uint8)


def label_probabilities(
    labels: np.ndarray, classes: Sequence[int], confidence: float
) -> np.ndarray:
    """A dense CRF's (K, H, W) float32 probabilities from a pseudo label, over `classes` (the
    background and the image's tags, in that order): a labelled pixel gives its class
    `confidence` and the K - 1 others an equal share of the rest; an unlabelled one (255) gives
    every class 1 / K, so its label comes from its neighbours."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} is not in (0, 1)")
    stray = np.setdiff1d(np.unique(labels), [*classes, IGNORE])
    if stray.size:
        raise ValueError(f"label values {stray.tolist()} are not among classes {list(classes)}")
    k = len(classes)
    if k < 2:  # one class: nothing to decide
        return np.ones((1, *labels.shape), np.float32)
    other = (1 - confidence) / (k - 1)
    probs = np.full((k, *labels.shape), other, np.float32)
    for index, value in enumerate(classes):
        probs[index][labels == value] = confidence
    probs[:, labels == IGNORE] = 1 / k
    return probs


def merge_crf_label(
    labels: np.ndarray, crf_index: np.ndarray, classes: Sequence[int], fill: bool
) -> np.ndarray:
    """The pseudo label after the CRF: `crf_index` (H, W) indexes `classes`. Every labelled pixel
    takes the CRF's class; an unlabelled one stays unlabelled, or with `fill` takes it too."""
    refined = np.asarray(classes, np.uint8)[crf_index]
    return refined if fill else np.where(labels == IGNORE, IGNORE, refined).astype(np.uint8)
