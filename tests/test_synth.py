"""The synthetic dataset: deterministic, self-consistent, loadable, and hard in the intended way."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepsl.data.datasets import load_folder
from aepsl.data.synth import SYNTH_CLASSES, Scene, SynthObject, make_synth, render_scene
from aepsl.errors import UserError

N, SIZE = 16, 64


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("synth") / "data", n=N, size=SIZE, seed=3)


def test_same_seed_gives_identical_files(synth_root: Path, tmp_path: Path) -> None:
    again = make_synth(tmp_path / "again", n=N, size=SIZE, seed=3)
    assert _files(again) == _files(synth_root)
    other = _files(make_synth(tmp_path / "other", n=N, size=SIZE, seed=4))
    first = _files(synth_root)
    assert other.keys() == first.keys()
    assert any(other[name] != first[name] for name in first if name.startswith("images/"))


def test_layout_and_images(synth_root: Path) -> None:
    assert (synth_root / "classes.txt").read_text().split() == list(SYNTH_CLASSES)
    assert len(SYNTH_CLASSES) == 5
    ids = [f"synth_{i:05d}" for i in range(N)]
    for image_id in ids:
        with Image.open(synth_root / "images" / f"{image_id}.png") as image:
            assert image.mode == "RGB"
            assert image.size == (SIZE, SIZE)
        with Image.open(synth_root / "masks" / f"{image_id}.png") as mask:
            assert mask.mode == "P"
            assert mask.size == (SIZE, SIZE)


def test_labels_agree_with_masks(synth_root: Path) -> None:
    with open(synth_root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "labels"]
    assert len(rows) == N + 1
    for image_id, names in rows[1:]:
        mask = np.asarray(Image.open(synth_root / "masks" / f"{image_id}.png"))
        present = {int(v) for v in np.unique(mask) if v}
        assert present, image_id
        assert present == {SYNTH_CLASSES.index(name) + 1 for name in names.split()}, image_id


def test_splits_partition_ids_and_load(synth_root: Path) -> None:
    train = (synth_root / "splits" / "train.txt").read_text().split()
    val = (synth_root / "splits" / "val.txt").read_text().split()
    assert not set(train) & set(val)
    assert sorted(train + val) == [f"synth_{i:05d}" for i in range(N)]
    assert len(val) == round(N * 0.25)

    dataset = load_folder(synth_root)
    assert dataset.classes == list(SYNTH_CLASSES)
    assert len(dataset.split("train")) == len(train)
    assert len(dataset.split("val")) == len(val)
    assert all(sample.mask is not None for sample in dataset.split("val"))


def test_heads_are_small_distinctive_parts() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = render_scene(rng, 128)
        assert 1 <= len(scene.objects) <= 3
        assert set(scene.labels) <= {obj.label for obj in scene.objects}
        for obj in scene.objects:
            head, body = int(obj.head.sum()), int(obj.body.sum())
            assert not (obj.head & obj.body).any()
            assert 0.04 <= head / (head + body) <= 0.12
            # Every mask pixel of a class comes from that class's object.
            assert not ((scene.mask == obj.label) & ~(obj.head | obj.body)).any()
        # Objects stay clear of the border, so border-based saliency sees background there.
        mask = scene.mask
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 3}, {"n": 2.5}, {"size": 47}, {"val_fraction": 0.0}, {"val_fraction": 1.0}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(UserError):
        make_synth(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_hidden_object_is_not_labelled() -> None:
    size = 48
    whole = np.zeros((size, size), bool)
    whole[10:30, 10:30] = True
    hidden = SynthObject(1, whole, np.zeros_like(whole))
    on_top = SynthObject(2, whole, np.zeros_like(whole))
    mask = np.where(whole, 2, 0).astype(np.uint8)
    scene = Scene(np.zeros((size, size, 3), np.uint8), mask, (hidden, on_top))
    assert scene.labels == (2,)
