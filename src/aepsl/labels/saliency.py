"""Built-in salient-object detector that needs no weights: MB+ (Zhang et al., ICCV 2015).

Stage 2 takes pseudo-label background from a saliency map (the paper used DRFI). Users who
have no precomputed maps still need one, so this module implements "Minimum Barrier Salient
Object Detection at 80 FPS" with numpy, scipy and scikit-image only:

1. Shrink the image so its longest side is `max_side`: the map is smooth and resized back
   anyway, and every step below costs at least O(pixels).
2. MBD map: the minimum barrier distance of every pixel to the image border (the seed set),
   per Lab channel after a median filter (5x5 at 300 px), summed over channels. Background
   regions touch the border through paths of nearly constant colour (small barrier); an
   object is separated from the border by its contour (large barrier).
3. Backgroundness map: per border strip (top, bottom, left, right) the Mahalanobis colour
   distance of every pixel to the strip's colour distribution; the four maps are summed
   minus their maximum, so background that differs between borders (sky above, ground
   below) does not count as salient.
4. Post-processing from the paper: centre bias (optional), morphological smoothing by
   reconstruction, with a kernel that grows with the map's mean, and a sigmoid contrast
   stretch around an adaptive threshold.

FastMBD's raster scan updates a pixel from its upper and left neighbours, a recurrence that is
sequential in both directions. Here each pass instead sweeps the four directions one after
another (down, right, up, left); a sweep updates a whole row (or column) from the previous one
in one numpy operation, so the Python loop runs O(H + W) times per pass rather than O(H * W).
Both schemes iterate the same local update and keep the barrier of a real path, so both can
only over-estimate the exact distance, less with every pass. Measured on three scikit-image
photos at 160 px (mean gap to the map after 30 passes, relative to its mean): the paper's three
raster scans 0.65-0.88, one sweep pass 0.45-0.70, two 0.15-0.27, three 0.06-0.17. Two passes
(about 7 ms each at 160 px) are the default: closer to the true distance than the paper's
scans, while the saliency quality measured on synthetic scenes did not change with the count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.morphology import reconstruction
from skimage.transform import resize

__all__ = ["mbd_saliency"]

# Number of four-direction sweep passes of the MBD transform (see the module docstring).
_N_PASSES = 2
# Side of the median filter applied to each Lab channel before the MBD transform, at a 300 px
# image (paper: 5). It scales with the working size like every other window here: 3 at 160 px.
_MEDIAN_SIZE = 5
# Width of each border strip of the backgroundness map, as a fraction of the side (paper: 0.1).
_MARGIN_RATIO = 0.1
# Covariance regulariser of the backgroundness map, in squared 0..255 colour units (paper: 50).
_COV_REG = 50.0
# Smoothing kernel width = _SMOOTH_ALPHA * sqrt(mean saliency) at a 300 px image (paper eq. 9).
_SMOOTH_ALPHA = 50.0
# Image side at which the paper's window sizes hold (it computes on a 300 px copy).
_PAPER_SIDE = 300
# Slope of the sigmoid contrast stretch (paper eq. 11: b = 10).
_CONTRAST_B = 10.0
# Rescaling of Lab's L (0..100) to 0..255, the span of a and b, as in the 8-bit Lab the paper
# used, so the three channels contribute comparably to the summed barrier distance.
_LAB_SCALE = np.array([2.55, 1.0, 1.0], dtype=np.float32)


def mbd_saliency(image: np.ndarray, max_side: int = 160, *, centre_bias: bool = True) -> np.ndarray:
    """Salient-object map of an RGB image, 1 = salient object, 0 = background.

    `image` is HxWx3 uint8 RGB. The map is computed on a copy whose longest side is at most
    `max_side` (smaller images are not enlarged) and resized back to HxW. `centre_bias`
    multiplies the map by a centre prior, as MB+ does: photos (PASCAL VOC) are usually framed
    around their objects; turn it off for data whose objects are placed anywhere.

    Returns an HxW float32 array in [0, 1]. An image with no structure as wide as the
    smoothing kernel (a constant image, pure noise) gets all zeros: nothing in it stands out.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    small_shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    if small_shape == (height, width):
        rgb = image.astype(np.float32)
    else:
        # Anti-aliasing averages like an area resize; preserve_range keeps the 0..255 scale.
        rgb = resize(image, small_shape, anti_aliasing=True, preserve_range=True)
        rgb = rgb.astype(np.float32)

    side = max(small_shape)
    median = 2 * round((_MEDIAN_SIZE * side / _PAPER_SIDE - 1) / 2) + 1  # nearest odd size
    lab = rgb2lab(rgb / 255.0).astype(np.float32) * _LAB_SCALE
    if median > 1:
        lab = ndimage.median_filter(lab, size=(median, median, 1), mode="nearest")
    saliency = _normalise(_mbd_map(lab)) + _backgroundness(rgb)
    if centre_bias:
        saliency *= _centre_map(small_shape)
    saliency = _normalise(saliency)
    kernel = max(1, int(_SMOOTH_ALPHA * side / _PAPER_SIDE * np.sqrt(saliency.mean())))
    saliency = _normalise(_smooth(saliency, kernel))
    if not saliency.any():
        # No structure as wide as the kernel (a constant image, or pure noise).
        return np.zeros((height, width), dtype=np.float32)
    saliency = _enhance_contrast(saliency)
    if small_shape != (height, width):
        saliency = resize(saliency, (height, width), order=1, anti_aliasing=False)
    return _normalise(saliency).astype(np.float32)


def _normalise(values: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1]; a constant array becomes zeros (no pixel stands out)."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _mbd_map(features: np.ndarray) -> np.ndarray:
    """Approximate minimum barrier distance to the border, summed over the channels.

    `features` is HxWxC. The barrier of a path is the maximum minus the minimum value along
    it; each pixel keeps the smallest barrier found so far together with that path's maximum
    (`upper`) and minimum (`lower`), and a sweep extends the paths of one row to the next.
    """
    dist = np.full(features.shape, np.inf, dtype=np.float32)
    for border in (dist[0], dist[-1], dist[:, 0], dist[:, -1]):
        border[...] = 0.0
    upper = features.copy()
    lower = features.copy()
    arrays = (features, dist, upper, lower)
    for _ in range(_N_PASSES):
        _sweep(*arrays)  # down
        _sweep(*(a.transpose(1, 0, 2) for a in arrays))  # right
        _sweep(*(a[::-1] for a in arrays))  # up
        _sweep(*(a.transpose(1, 0, 2)[::-1] for a in arrays))  # left
    return dist.sum(axis=2)


def _sweep(features: np.ndarray, dist: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> None:
    """Extend the best path of each pixel in row i - 1 to row i, for i = 1, 2, ... in order.

    Works in place on views, so the caller picks the direction by flipping or transposing.
    Border pixels have distance 0 and are never replaced (a barrier is never negative).
    """
    for i in range(1, features.shape[0]):
        value = features[i]
        new_upper = np.maximum(upper[i - 1], value)
        new_lower = np.minimum(lower[i - 1], value)
        barrier = new_upper - new_lower
        better = barrier < dist[i]
        np.copyto(dist[i], barrier, where=better)
        np.copyto(upper[i], new_upper, where=better)
        np.copyto(lower[i], new_lower, where=better)


def _backgroundness(rgb: np.ndarray) -> np.ndarray:
    """Colour distance to the border strips, in [0, 1] (MB+'s image boundary contrast map).

    MBD alone misses objects whose colours also occur on some path to the border; a pixel
    whose colour is far from the border colours is likely foreground however it connects to
    the border. Background often differs between borders (sky above, ground below), so the
    four strip maps are summed minus their maximum: a pixel that is unlike one strip only,
    such as sky compared with the ground strip, does not count as salient.
    """
    height, width, channels = rgb.shape
    rows = max(1, round(_MARGIN_RATIO * height))
    cols = max(1, round(_MARGIN_RATIO * width))
    strips = (rgb[:rows], rgb[-rows:], rgb[:, :cols], rgb[:, -cols:])
    pixels = rgb.reshape(-1, channels).astype(np.float64)
    maps = []
    for strip in strips:
        samples = strip.reshape(-1, channels).astype(np.float64)
        centred = samples - samples.mean(axis=0)
        cov = centred.T @ centred / max(len(samples) - 1, 1) + _COV_REG * np.eye(channels)
        # Whitening by the inverse square root of the covariance makes the Euclidean norm the
        # Mahalanobis distance.
        eigvals, eigvecs = np.linalg.eigh(cov)
        whiten = eigvecs / np.sqrt(eigvals)
        distance = np.linalg.norm((pixels - samples.mean(axis=0)) @ whiten, axis=1)
        maps.append(_normalise(distance))
    stacked = np.stack(maps)
    combined = stacked.sum(axis=0) - stacked.max(axis=0)
    return _normalise(combined.reshape(height, width)).astype(np.float32)


def _centre_map(shape: tuple[int, int]) -> np.ndarray:
    """1 at the image centre falling linearly to 0 at the corners, in normalised coordinates."""
    ys = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
    return 1.0 - np.sqrt(ys**2 + xs**2) / np.sqrt(2.0)


def _smooth(saliency: np.ndarray, width: int) -> np.ndarray:
    """Opening by reconstruction, then closing by reconstruction, with a square `width` kernel.

    Removes bright specks narrower than the kernel and fills dark holes inside the object,
    while (unlike a plain opening/closing) keeping the object's contour where it was.
    """
    eroded = ndimage.grey_erosion(saliency, size=(width, width))
    opened = reconstruction(eroded, saliency, method="dilation")
    dilated = ndimage.grey_dilation(opened, size=(width, width))
    return reconstruction(dilated, opened, method="erosion")


def _enhance_contrast(saliency: np.ndarray) -> np.ndarray:
    """Sigmoid stretch around the midpoint of the foreground and background means.

    The split at half the maximum gives a rough object/background partition; centring the
    sigmoid between the two means pushes each side towards 0 or 1, which is what a threshold
    on the map (the background rule of stage 2) needs.
    """
    high = saliency >= 0.5 * saliency.max()
    threshold = 0.5 * (saliency[high].mean() + saliency[~high].mean())
    return 1.0 / (1.0 + np.exp(-_CONTRAST_B * (saliency - threshold)))
