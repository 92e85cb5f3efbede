"""The permutohedral lattice and the torch dense CRF: lattice pieces on their own, the sparse
operator against the scatter/gather steps, batching, and agreement with pydensecrf."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from aepsl.errors import UserError
from aepsl.inference import lattice as lat
from aepsl.inference.crf import crf_labels_torch, dense_crf, dense_crf_torch, resolve_backend
from aepsl.inference.crf_params import CrfParams
from aepsl.inference.meanfield import mean_field

needs_crf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason="the 'crf' extra is not installed"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def grid_features(n: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(
        torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([x.reshape(-1), y.reshape(-1)], 1) / sigma, x, y


def test_simplex_corners_surround_the_elevated_point():
    """Barycentric weights are >= 0 and sum to 1, the corners are lattice points of remainder
    0..d on the hyperplane, and the weighted corners give the point back."""
    features = torch.randn(500, 5, dtype=torch.float64) * 3
    elevated = lat._elevate(features)  # (d+1, P)
    torch.testing.assert_close(elevated.sum(0), torch.zeros(500, dtype=torch.float64))
    quotient, rank, weights = lat._enclosing_simplex(elevated)
    d1 = 6
    assert (weights >= -1e-12).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(500, dtype=torch.float64))
    assert (rank.sort(0).values == torch.arange(d1)[:, None]).all()  # a permutation
    remainder = torch.arange(d1)
    # corners[r, i, p]: coordinate i of corner r of point p
    corners = d1 * quotient[None] + remainder[:, None, None]
    corners = corners - d1 * (rank[None] > (d1 - 1 - remainder)[:, None, None]).long()
    assert (corners.sum(1) == 0).all()
    assert ((corners - remainder[:, None, None]) % d1 == 0).all()
    torch.testing.assert_close((weights[:, None] * corners).sum(0), elevated)


def test_filter_of_a_constant_is_constant_after_normalisation():
    features, _, _ = grid_features(40, 3.0)
    lattice = lat.build(features)
    norm = lat.filter(lattice, torch.ones(features.shape[0], 1))[:, 0]
    inner = norm.view(40, 40)[12:-12, 12:-12]
    assert (inner.max() - inner.min()) / inner.mean() < 0.01  # a regular tiling inside
    values = torch.full((features.shape[0], 3), 2.5)
    torch.testing.assert_close(lat.filter(lattice, values) / norm[:, None], values)


@pytest.mark.parametrize("centre", [(30, 30), (31, 33)])
def test_impulse_response_is_the_gaussian_within_the_lattice_approximation(centre):
    """The filter of an impulse on a dense grid: standard deviation 1 in feature units within
    3%; after matching the mass, within 20% of the peak of exp(-r^2 / 2) everywhere (the
    permutohedral blur is a piecewise-linear, slightly lower-peaked approximation)."""
    sigma, n = 3.0, 61
    features, x, y = grid_features(n, sigma)
    impulse = torch.zeros(n * n, 1)
    impulse[centre[0] * n + centre[1]] = 1
    out = lat.filter(lat.build(features), impulse)[:, 0].view(n, n)
    r2 = ((x - centre[1]) ** 2 + (y - centre[0]) ** 2) / sigma**2
    std = math.sqrt(float((out * r2).sum() / out.sum() / 2))
    assert abs(std - 1) < 0.03
    gaussian = torch.exp(-r2 / 2)
    gaussian = gaussian * out.sum() / gaussian.sum()
    assert float((out - gaussian).abs().max() / gaussian.max()) < 0.2
    peak = divmod(int(out.argmax()), n)
    assert abs(peak[0] - centre[0]) <= 1 and abs(peak[1] - centre[1]) <= 1  # 1/3 of sigma


def test_sparse_operator_is_splat_blur_slice():
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(300, 5, generator=generator) * torch.tensor([2.0, 2.0, 9.0, 9.0, 9.0])
    groups = torch.arange(300) // 120
    big = lat.build(features, groups)
    small = lat.build(features[:, :2] * 4)
    values = torch.rand(300, 4, generator=generator)
    pre = [torch.rand(300, generator=generator) + 0.5 for _ in range(2)]
    post = [torch.rand(300, generator=generator) + 0.5 for _ in range(2)]
    expected = sum(
        p[:, None] * lat.filter(lattice, q[:, None] * values)
        for lattice, q, p in zip([small, big], pre, post, strict=True)
    )
    operator = lat.operator([small, big], pre, post)
    torch.testing.assert_close(operator(values), expected)
    torch.testing.assert_close(operator(values, add=values), expected + values)


def test_groups_keep_the_images_apart():
    generator = torch.Generator().manual_seed(1)
    first = torch.rand(200, 3, generator=generator) * 4
    second = torch.rand(150, 3, generator=generator) * 4
    values = torch.rand(350, 2, generator=generator)
    together = lat.build(torch.cat([first, second]), torch.arange(350) // 200)
    apart = lat.concat([lat.build(first), lat.build(second)])
    torch.testing.assert_close(lat.filter(together, values), lat.filter(apart, values))
    torch.testing.assert_close(
        lat.filter(together, values)[:200], lat.filter(lat.build(first), values[:200])
    )


def real_image(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.chelsea()).resize(size, Image.BILINEAR)).copy()


def noisy_softmax(image: np.ndarray, classes: int = 4, seed: int = 0) -> np.ndarray:
    """(K, H, W) float32: grey-level bands of the image as 'truth', one-hot, noise, softmax."""
    rng = np.random.default_rng(seed)
    truth = np.minimum(image.mean(2) * classes // 256, classes - 1).astype(np.int64)
    logits = 2.0 * np.eye(classes)[truth].transpose(2, 0, 1) + rng.normal(
        0, 1.2, (classes, *truth.shape)
    )
    return torch.softmax(torch.from_numpy(logits), 0).float().numpy()


@needs_crf
def test_torch_crf_agrees_with_pydensecrf_on_a_real_image():
    image = real_image()
    probs = noisy_softmax(image)
    reference = dense_crf(image, probs, CrfParams.defaults(iterations=5))
    (mine,) = dense_crf_torch([image], [probs], params=CrfParams.defaults(iterations=5))
    assert mine.shape == reference.shape and mine.dtype == np.float32
    assert np.abs(mine - reference).max() < 1e-4
    assert (mine.argmax(0) == reference.argmax(0)).mean() >= 0.995
    assert (reference.argmax(0) != probs.argmax(0)).mean() > 0.05  # the CRF did change labels


def test_a_batch_is_its_images_one_by_one():
    images = [real_image((40, 30)), real_image((33, 41))]
    probs = [noisy_softmax(images[0], seed=1), noisy_softmax(images[1], seed=2)]
    params = CrfParams.defaults(iterations=3, bilateral_xy_std=20.0, bilateral_rgb_std=10.0)
    batch = dense_crf_torch(images, probs, params=params)
    for image, prob, together in zip(images, probs, batch, strict=True):
        (alone,) = dense_crf_torch([image], [prob], params=params)
        np.testing.assert_allclose(together, alone, atol=1e-6)
        np.testing.assert_allclose(together.sum(0), 1, atol=1e-5)
    labels = crf_labels_torch(images, probs, batch=2, params=params)
    assert [lab.dtype for lab in labels] == [np.uint8, np.uint8]
    for lab, together in zip(labels, batch, strict=True):
        np.testing.assert_array_equal(lab, together.argmax(0))


def test_tensor_batch_input():
    image = real_image((24, 16))
    other = image[::-1].copy()
    probs = noisy_softmax(image)
    images_t = torch.from_numpy(np.stack([image, other]))
    probs_t = torch.from_numpy(np.stack([probs, probs[::-1].copy()]))
    out = mean_field(images_t, probs_t, CrfParams.defaults(iterations=2))
    assert len(out) == 2 and out[0].shape == (4, 16, 24) and out[0].device == probs_t.device
    listed = mean_field(
        [image, other], [probs, probs[::-1].copy()], CrfParams.defaults(iterations=2)
    )
    for a, b in zip(out, listed, strict=True):
        torch.testing.assert_close(a, b)


def test_backend_choice():
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("pydensecrf", "cuda") == "pydensecrf"
    assert resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("auto", "cpu") in ("torch", "pydensecrf")
    with pytest.raises(UserError, match=r"crf\.backend"):
        resolve_backend("fast", "cpu")


@needs_cuda
def test_same_code_on_cuda():
    image = real_image((32, 24))
    probs = noisy_softmax(image)
    (cpu,) = dense_crf_torch([image], [probs], params=CrfParams.defaults(iterations=3))
    (gpu,) = dense_crf_torch([image], [probs], "cuda", CrfParams.defaults(iterations=3))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


class BrightIsClassOne(torch.nn.Module):
    """A stand-in segmentation network: class 1 where the image is bright, blurry scores."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bright = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 5, 1, 2)
        return torch.cat([-bright, bright], 1), torch.zeros(x.shape[0], 1)


@pytest.mark.parametrize(
    ("backend", "workers"),
    [("torch", 1), ("torch", 2), pytest.param("pydensecrf", 1, marks=needs_crf)],
)
def test_predict_honours_the_backend(tmp_path, backend, workers):
    """crf.workers = 1: torch in this process; 2: a pool of one-thread torch processes."""
    from PIL import Image

    from aepsl.config import load_config
    from aepsl.inference.predict import crf_available, images_in, predict_samples
    from aepsl.io import read_index_png

    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(48, 32), (40, 40)]):
        Image.fromarray(real_image(size)).save(folder / f"im{i}.png")
    config = load_config(
        None, [f"crf.backend={backend}", f"crf.workers={workers}", "precision=fp32"]
    )
    assert crf_available(config)
    out = tmp_path / f"{backend}{workers}"
    predict_samples(BrightIsClassOne(), images_in(folder), config, torch.device("cpu"), None, out)
    labels = read_index_png(out / "im1.png")
    assert labels.shape == (40, 40) and set(np.unique(labels)) <= {0, 1}
