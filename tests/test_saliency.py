"""Tests of the built-in MB+ saliency detector (stage 2's weight-free background source)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from aepsl.labels.saliency import _mbd_map, mbd_saliency


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive pixel outscores a negative one.

    Average ranks count ties as half, which matters: saliency maps have flat regions.
    """
    ranks = stats.rankdata(score.ravel())
    pos = positive.ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _scene(
    height: int, width: int, centre: tuple[float, float], radius: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A dark, textured, cluttered background with one bright disc; returns (image, disc mask).

    Centre and radius are fractions of the height and width. The clutter (blotchy colour,
    pixel noise and small darkish rectangles) gives the background real contrast, so the test
    fails if the detector merely finds "anything that is not flat".
    """
    rng = np.random.default_rng(seed)
    background = ndimage.zoom(rng.uniform(20, 90, (6, 6, 3)), (height / 6, width / 6, 1), order=1)
    image = background[:height, :width] + rng.normal(0, 8, (height, width, 3))
    for _ in range(12):
        top, left = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(2, max(3, height // 8)), rng.integers(2, max(3, width // 8))
        image[top : top + h, left : left + w] = rng.uniform(10, 110, 3)
    ys, xs = np.mgrid[0:height, 0:width]
    disc = ((ys - centre[0] * height) / (radius * height)) ** 2 + (
        (xs - centre[1] * width) / (radius * width)
    ) ** 2 <= 1.0
    image[disc] = np.array([230.0, 190.0, 60.0]) + rng.normal(0, 8, (int(disc.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), disc


def _exact_mbd(values: np.ndarray) -> np.ndarray:
    """Exact minimum barrier distance to the border of a small one-channel image, by brute force.

    A pixel's distance is the narrowest value band [low, high] in which a 4-connected path
    links it to the border: try every band and keep, per pixel, the narrowest that works.
    """
    border = np.zeros(values.shape, dtype=bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    best = np.full(values.shape, np.inf)
    levels = np.unique(values)
    for low in levels:
        for high in levels[levels >= low]:
            band = (values >= low) & (values <= high)
            components, _ = ndimage.label(band)
            linked = np.isin(components, components[border & band]) & band
            best[linked] = np.minimum(best[linked], high - low)
    return best


def test_barrier_distance_crosses_a_closed_ring_only() -> None:
    values = np.zeros((9, 9), dtype=np.float32)
    values[2:7, 2:7] = 200.0
    values[3:6, 3:6] = 0.0  # a dark hole inside a bright ring
    closed = _mbd_map(values[..., None])
    assert closed[4, 4] == 200.0  # every path to the border climbs over the ring
    values[4, 2] = 0.0  # open a gap in the ring
    opened = _mbd_map(values[..., None])
    assert opened[4, 4] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_barrier_distance_is_a_tight_upper_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 10, (4, 4)).astype(np.float32)
    values = ndimage.zoom(coarse, 3, order=1).round() + rng.integers(0, 3, (12, 12))
    approx = _mbd_map(values[..., None].astype(np.float32))
    exact = _exact_mbd(values)
    assert (approx >= exact - 1e-6).all()  # the barrier of a real path, never below the minimum
    assert np.isclose(approx, exact).mean() > 0.75


@pytest.mark.parametrize("centre", [(0.5, 0.5), (0.35, 0.65)])
@pytest.mark.parametrize("centre_bias", [True, False])
def test_bright_disc_is_salient(centre: tuple[float, float], centre_bias: bool) -> None:
    image, disc = _scene(150, 200, centre, 0.2)
    saliency = mbd_saliency(image, centre_bias=centre_bias)
    assert saliency[disc].mean() - saliency[~disc].mean() > 0.3
    assert _auc(saliency, disc) > 0.9


def test_disc_found_when_image_is_shrunk() -> None:
    image, disc = _scene(240, 320, (0.5, 0.45), 0.2, seed=3)
    saliency = mbd_saliency(image, max_side=64)
    assert saliency.shape == disc.shape
    assert _auc(saliency, disc) > 0.9


@pytest.mark.parametrize(
    "shape", [(1, 1), (2, 3), (20, 30), (33, 47), (47, 33), (101, 64), (321, 321), (400, 150)]
)
def test_shape_range_and_dtype(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    saliency = mbd_saliency(image)
    assert saliency.shape == shape
    assert saliency.dtype == np.float32
    assert np.isfinite(saliency).all()
    assert saliency.min() >= 0.0
    assert saliency.max() <= 1.0


@pytest.mark.parametrize("value", [0, 128, 255])
def test_constant_image_is_all_background(value: int) -> None:
    saliency = mbd_saliency(np.full((37, 53, 3), value, dtype=np.uint8))
    assert np.isfinite(saliency).all()
    assert not saliency.any()


def test_deterministic() -> None:
    image, _ = _scene(90, 120, (0.5, 0.5), 0.25, seed=7)
    first = mbd_saliency(image)
    np.testing.assert_array_equal(first, mbd_saliency(image))
    np.testing.assert_array_equal(first, mbd_saliency(image.copy()))


def test_input_not_modified() -> None:
    image, _ = _scene(60, 80, (0.5, 0.5), 0.25)
    before = image.copy()
    mbd_saliency(image)
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), dtype=np.uint8),
        np.zeros((10, 10, 4), dtype=np.uint8),
        np.zeros((10, 10, 3), dtype=np.float32),
    ],
)
def test_rejects_non_rgb_uint8(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        mbd_saliency(bad)


def test_rejects_bad_max_side() -> None:
    with pytest.raises(ValueError, match="max_side"):
        mbd_saliency(np.zeros((10, 10, 3), dtype=np.uint8), max_side=0)


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_real_photo(name: str) -> None:
    data = pytest.importorskip("skimage.data")
    try:
        image = getattr(data, name)()
    except Exception as error:  # the data files are optional in some installs
        pytest.skip(f"skimage.data.{name} unavailable: {error}")
    saliency = mbd_saliency(image)
    assert saliency.shape == image.shape[:2]
    assert saliency.dtype == np.float32
    assert saliency.min() == 0.0
    assert saliency.max() == 1.0
