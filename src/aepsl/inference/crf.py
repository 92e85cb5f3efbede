"""Dense CRF post-processing (Krähenbühl & Koltun 2011) with DeepLab-LargeFOV's parameters,
by one of two backends of the same model (`crf.backend`):

- pydensecrf: an optional dependency (the 'crf' extra), imported only when a CRF is run.
- torch: aepsl.inference.meanfield, batched, on a GPU or the CPU; no extra.

On the CPU both run one image per process in a Pool of `crf.workers` processes (`crf_pool`,
`crf_job`: top-level functions of picklable arguments), torch with one thread per process:
torch's threads in one process stall when another process holds a core (measured in
docs/crf.md). On a GPU, or with one worker, `crf_labels_torch` labels a list of images in the
calling process.

This module imports torch only inside the torch functions, so pydensecrf's workers stay light.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Sequence
from multiprocessing.pool import Pool
from typing import TYPE_CHECKING

import numpy as np

from aepsl.errors import UserError
from aepsl.inference.crf_params import CrfParams
from aepsl.workers import ctrl_c_ignored, worker_setup

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "pydensecrf", "torch")
# what `auto` takes on the CPU (on a GPU it takes torch), from benchmarks/bench_crf.py
AUTO_CPU = "torch"


def pydensecrf_installed() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """'pydensecrf' or 'torch' for a `crf.backend` setting on `device`: auto takes torch on a
    GPU, and AUTO_CPU on the CPU (torch if pydensecrf is not installed)."""
    if backend not in BACKENDS:
        raise UserError(f"crf.backend: '{backend}' is none of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if str(device).startswith("cuda") or not pydensecrf_installed():
        return "torch"
    return AUTO_CPU


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams | None = None) -> np.ndarray:
    """Refine (K, H, W) class probabilities of an (H, W, 3) uint8 image; returns (K, H, W)
    float32 marginals. Unary = -log(probs); pairwise = a Gaussian smoothness kernel plus an
    appearance (bilateral) kernel (default: the config's, DeepLab-LargeFOV's)."""
    params = params or CrfParams.defaults()
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise UserError("dense CRF needs the 'crf' extra: pip install 'aepsl[crf]'") from exc
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=params.gaussian_xy_std, compat=params.gaussian_weight)
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    if not rgb.flags.writeable:  # pydensecrf takes a writable buffer only
        rgb = rgb.copy()
    crf.addPairwiseBilateral(
        sxy=params.bilateral_xy_std,
        srgb=params.bilateral_rgb_std,
        rgbim=rgb,
        compat=params.bilateral_weight,
    )
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)


def crf_labels(job: tuple[np.ndarray, np.ndarray], params: CrfParams | None = None) -> np.ndarray:
    """(H, W) uint8 argmax of `dense_crf(image, probs, params)` for `job = (image, probs)`;
    for `Pool.map`, with `functools.partial(crf_labels, params=...)` to change the parameters."""
    image, probs = job
    return dense_crf(image, probs, params).argmax(axis=0).astype(np.uint8)


def dense_crf_torch(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    params: CrfParams | None = None,
) -> list[np.ndarray]:
    """`dense_crf` of each image with the torch backend, all in one batched mean field on
    `device`: (K, H, W) float32 marginals."""
    from aepsl.inference.meanfield import mean_field

    return [q.cpu().numpy() for q in mean_field(images, probs, params, device)]


def crf_labels_torch(
    images: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    batch: int | None = None,
    params: CrfParams | None = None,
) -> list[np.ndarray]:
    """(H, W) uint8 CRF labels of each image with the torch backend, `batch` images per mean
    field (default: all of them on a GPU, one at a time on the CPU, where batching is no
    faster and memory grows with the batch)."""
    import torch

    from aepsl.inference.meanfield import mean_field_labels

    if batch is None:
        batch = len(images) if torch.device(device).type == "cuda" else 1
    labels = []
    for start in range(0, len(images), max(batch, 1)):
        refined = mean_field_labels(
            images[start : start + batch], probs[start : start + batch], params, device
        )
        labels += [label.cpu().numpy() for label in refined]
    return labels


def crf_labels_torch_job(
    job: tuple[np.ndarray, np.ndarray], params: CrfParams | None = None
) -> np.ndarray:
    """`crf_labels` with the torch backend on the CPU: for `Pool.map` in `crf_pool`."""
    image, probs = job
    return crf_labels_torch([image], [probs], "cpu", 1, params)[0]


def crf_pool(backend: str, workers: int) -> Pool:
    """A spawn Pool of `workers` CRF processes for `backend` (torch ones use one thread)."""
    with ctrl_c_ignored():  # Pool starts its processes here
        return multiprocessing.get_context("spawn").Pool(
            workers, initializer=worker_setup, initargs=(backend == "torch",)
        )


def crf_job(backend: str, params: CrfParams) -> functools.partial:
    """The picklable per-image function of `backend` for `crf_pool`: (image, probs) -> labels."""
    job = crf_labels_torch_job if backend == "torch" else crf_labels
    return functools.partial(job, params=params)
