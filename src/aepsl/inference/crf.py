"""Dense CRF post-processing (Krähenbühl & Koltun 2011) with DeepLab-LargeFOV's parameters.

pydensecrf is an optional dependency (the 'crf' extra), imported only when a CRF is run.
`crf_labels` is a top-level function of picklable arguments, so callers can spread images over
a multiprocessing Pool: the CRF runs on the CPU, one image per process.
"""

from __future__ import annotations

import numpy as np

from aepsl.errors import UserError


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    bi_w: float = 4,
    bi_xy: float = 121,
    bi_rgb: float = 5,
    pos_w: float = 3,
    pos_xy: float = 3,
) -> np.ndarray:
    """Refine (K, H, W) class probabilities of an (H, W, 3) uint8 image; returns (K, H, W)
    float32 marginals. Unary = -log(probs); pairwise = a Gaussian smoothness kernel plus an
    appearance (bilateral) kernel, with the DeepLab-LargeFOV defaults."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise UserError("dense CRF needs the 'crf' extra: pip install 'aepsl[crf]'") from exc
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=pos_xy, compat=pos_w)
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    crf.addPairwiseBilateral(sxy=bi_xy, srgb=bi_rgb, rgbim=rgb, compat=bi_w)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(classes, height, width)


def crf_labels(job: tuple[np.ndarray, np.ndarray], **params: float) -> np.ndarray:
    """(H, W) uint8 argmax of `dense_crf(image, probs, **params)` for `job = (image, probs)`;
    for `Pool.map`, with `functools.partial(crf_labels, ...)` to change the parameters."""
    image, probs = job
    return dense_crf(image, probs, **params).argmax(axis=0).astype(np.uint8)
