"""The label-map encoding every stage reads and writes: uint8 index maps in palette PNGs.

  0          background (pseudo labels, predictions, ground truth); nothing mined (regions)
  1..C       class k of the dataset's classes.txt order
  255        IGNORE in pseudo labels and ground truth (not scored, not trained on);
             CONFLICT in mined regions (two or more classes mined at that pixel)

One value, two names: a conflict pixel becomes an ignored pixel of the pseudo labels.
"""

from __future__ import annotations

import numpy as np

BACKGROUND = 0
IGNORE = 255
CONFLICT = 255


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 RGB triplets flattened."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


PALETTE = voc_palette()
_COLOURS = np.array(PALETTE, np.uint8).reshape(256, 3)


def colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 VOC colours of an (H, W) label map."""
    return _COLOURS[labels]
