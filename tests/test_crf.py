"""Dense CRF: a valid distribution that follows colour edges; a clear error without the extra."""

import importlib.util
import pickle
import sys

import numpy as np
import pytest

from aepsl.errors import UserError
from aepsl.inference.crf import crf_labels, dense_crf
from aepsl.inference.crf_params import CrfParams

needs_crf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason="the 'crf' extra is not installed"
)


def two_halves(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 20x20 image, left half dark and right half bright, with noisy 2-class probabilities."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((20, 20), np.int64)
    truth[:, 10:] = 1
    image = np.where(truth[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=2)
    right = np.where(truth == 1, 0.7, 0.3) + rng.normal(0, 0.25, truth.shape)
    right = np.clip(right, 0.01, 0.99)
    return image, np.stack([1 - right, right]).astype(np.float32), truth


@needs_crf
def test_crf_gives_a_distribution_that_follows_the_colours():
    image, probs, truth = two_halves()
    refined = dense_crf(image, probs)
    assert refined.shape == probs.shape and refined.dtype == np.float32
    assert np.all(refined >= 0)
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    noisy = (probs.argmax(axis=0) == truth).mean()
    assert noisy < 0.95  # the test needs noise to remove
    assert (refined.argmax(axis=0) == truth).mean() > noisy


@needs_crf
def test_crf_labels_is_picklable_and_is_the_argmax():
    image, probs, _ = two_halves(1)
    worker = pickle.loads(pickle.dumps(crf_labels))
    params = CrfParams.defaults(iterations=5)
    labels = worker((image, probs), params)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, dense_crf(image, probs, params).argmax(axis=0))


def test_missing_pydensecrf_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, probs, _ = two_halves()
    with pytest.raises(UserError, match=r"aepsl\[crf\]"):
        dense_crf(image, probs)
