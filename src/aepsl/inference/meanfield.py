"""Dense CRF mean-field inference (Krähenbühl & Koltun 2011) in PyTorch, batched over images,
on the CPU or a GPU with the same code.

The model is the one pydensecrf builds for DeepLab: unary -log(p) (p clipped to 1e-5, as
pydensecrf.utils.unary_from_softmax), a Gaussian kernel on the pixel position (x, y) / pos_xy
and a bilateral kernel on (x / bi_xy, y / bi_xy, r / bi_rgb, g / bi_rgb, b / bi_rgb), each with
Potts compatibility of weight pos_w / bi_w and symmetric normalisation: kernel k filters
n_k * Q and scales the result by n_k again, n_k = (lattice filter of 1)^-1/2. Mean field:
Q_0 = softmax(-U), Q_t+1 = softmax(-U + sum_k w_k n_k filter_k(n_k Q_t)), as pydensecrf's
`inference` (its Potts term -w * filter, subtracted). Filtering uses the permutohedral lattice
of aepsl.inference.lattice, like pydensecrf, so the two agree to float rounding.

Images of a batch share one lattice per kernel (points grouped by image); the Gaussian lattice
depends only on the image size and is cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from aepsl.inference import lattice as lat
from aepsl.inference.crf_params import CrfParams

UNARY_CLIP = 1e-5
# the Gaussian kernel's lattice and normalisation per (height, width, std, device)
_CACHE: OrderedDict[tuple, tuple[lat.Lattice, Tensor]] = OrderedDict()
_CACHE_SIZE = 8


def _positions(height: int, width: int, device: torch.device) -> Tensor:
    """(H*W, 2) float32 (x, y) of the pixels in row-major order."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([x.reshape(-1), y.reshape(-1)], 1)


def _gaussian_lattice(
    height: int, width: int, xy: float, device: torch.device
) -> tuple[lat.Lattice, Tensor]:
    key = (height, width, float(xy), str(device))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    lattice = lat.build(_positions(height, width, device) / xy)
    _CACHE[key] = lattice, _norm(lattice)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return _CACHE[key]


def _norm(lattice: lat.Lattice) -> Tensor:
    """(P,) symmetric normalisation (filter of 1 + 1e-20)^-1/2."""
    return lat.filter_ones(lattice).add_(1e-20).rsqrt_()


def _exp_normalise(x: Tensor) -> Tensor:
    x = x.exp_()
    # row sums as a product with ones: a third faster than sum(1) over 21 classes on a CPU
    return x.div_(x @ x.new_ones(x.shape[1], 1))


def _softmax(x: Tensor) -> Tensor:
    return torch.softmax(x, dim=1)


def crf_operator(images: Sequence[Tensor], params: CrfParams) -> lat.Operator:
    """The pairwise message of the CRF over the pixels of (H, W, 3) uint8 `images` (one
    device), concatenated in order: x -> sum_k w_k n_k filter_k(n_k x)."""
    device = images[0].device
    bi_xy, bi_rgb, pos_xy = (
        params.bilateral_xy_std,
        params.bilateral_rgb_std,
        params.gaussian_xy_std,
    )
    cached = [_gaussian_lattice(im.shape[0], im.shape[1], pos_xy, device) for im in images]
    gaussian = lat.concat([lattice for lattice, _ in cached])
    gaussian_norm = torch.cat([norm for _, norm in cached])
    features = torch.cat(
        [
            torch.cat(
                [
                    _positions(im.shape[0], im.shape[1], device) / bi_xy,
                    im.reshape(-1, 3).float() / bi_rgb,
                ],
                1,
            )
            for im in images
        ]
    )
    groups = None
    if len(images) > 1:
        sizes = torch.tensor([im.shape[0] * im.shape[1] for im in images], device=device)
        groups = torch.arange(len(images), device=device).repeat_interleave(sizes)
    bilateral = lat.build(features, groups)
    norms = [gaussian_norm, _norm(bilateral)]
    return lat.operator(
        [gaussian, bilateral],
        pre=norms,
        post=[params.gaussian_weight * norms[0], params.bilateral_weight * norms[1]],
    )


def _refine(
    images: Sequence[np.ndarray | Tensor] | Tensor,
    probs: Sequence[np.ndarray | Tensor] | Tensor,
    params: CrfParams,
    device: torch.device | str | None,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """The (P, K) marginals of all the pixels, image after image, and the images' sizes."""
    if device is None:
        device = probs.device if isinstance(probs, Tensor) else torch.device("cpu")
    device = torch.device(device)
    images_t = [im if isinstance(im, Tensor) else torch.tensor(np.asarray(im)) for im in images]
    images_t = [im.to(device=device, dtype=torch.uint8) for im in images_t]
    probs_t = [torch.as_tensor(p).to(device=device, dtype=torch.float32) for p in probs]
    classes = probs_t[0].shape[0]
    for im, p in zip(images_t, probs_t, strict=True):
        if p.shape[0] != classes or p.shape[1:] != im.shape[:2] or im.shape[2:] != (3,):
            raise ValueError(f"image {tuple(im.shape)} does not fit probabilities {tuple(p.shape)}")
    message = crf_operator(images_t, params)
    # -U = log p, clipped as pydensecrf (on the (K, H*W) layout, then one transposition to
    # (P, K): a row per pixel, images one after the other). Softmax is shift invariant per row:
    # shifted so that the most likely class has -U = 0, -U + message lies in
    # [log(1e-5), bound] with bound = the message of Q = 1 (all terms are >= 0), and exp needs
    # no max (a third of the time of torch.softmax) unless the bound nears float32's exp range.
    neg_unary = torch.cat(
        [p.reshape(classes, -1).clamp(UNARY_CLIP, 1.0).log_().t() for p in probs_t]
    )
    neg_unary -= neg_unary.amax(1, keepdim=True)
    bound = float(message(torch.ones_like(neg_unary[:, :1])).max())
    normalise = _exp_normalise if bound < 60 else _softmax
    q = normalise(neg_unary.clone())
    for _ in range(params.iterations):
        q = normalise(message(q, add=neg_unary, out=q))
    return q, [(im.shape[0], im.shape[1]) for im in images_t]


def mean_field(
    images: Sequence[np.ndarray | Tensor] | Tensor,
    probs: Sequence[np.ndarray | Tensor] | Tensor,
    params: CrfParams | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Refined (K, H, W) float32 marginals of each (H, W, 3) uint8 image with its (K, H, W)
    class probabilities (a list, or batched tensors (B, H, W, 3), (B, K, H, W)); all images in
    one mean field, on `device` (default: the device of the probabilities, else the CPU);
    `params`: iterations, kernel weights and widths (default: the config's, DeepLab-LargeFOV's)."""
    q, sizes = _refine(images, probs, params or CrfParams.defaults(), device)
    out, start = [], 0
    for height, width in sizes:
        marginals = q[start : start + height * width].t()
        out.append(marginals.reshape(q.shape[1], height, width))
        start += height * width
    return out


def mean_field_labels(
    images: Sequence[np.ndarray | Tensor] | Tensor,
    probs: Sequence[np.ndarray | Tensor] | Tensor,
    params: CrfParams | None = None,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """The (H, W) uint8 argmax of `mean_field` (classes < 256), without its transposition."""
    q, sizes = _refine(images, probs, params or CrfParams.defaults(), device)
    labels = q.max(1).indices.to(torch.uint8)  # the first maximum, as argmax; twice as fast
    out, start = [], 0
    for height, width in sizes:
        out.append(labels[start : start + height * width].view(height, width))
        start += height * width
    return out
