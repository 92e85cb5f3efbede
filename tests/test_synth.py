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


# ------------------------------------------------------------------ --classes and --objects


def _digest(root: Path) -> str:
    """sha256 over file names and decoded contents (pixels of PNGs, bytes of text files)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            if path.suffix == ".png":
                h.update(np.asarray(Image.open(path)).tobytes())
            else:
                h.update(path.read_bytes())
    return h.hexdigest()


def test_defaults_give_the_data_of_before_the_options(tmp_path: Path) -> None:
    # Digest of make_synth(n=8, size=64, seed=0) computed with the code before `classes` and
    # `objects` existed (commit f46601e): the demo's data must not change.
    root = make_synth(tmp_path / "d", n=8, size=64, seed=0)
    assert _digest(root) == "133dd5d223f52de8e85f8148a0e33f6c571556a5a72f617a567e27134d562085"
    same = make_synth(tmp_path / "five", n=8, size=64, seed=0, classes=5)
    assert _files(same) == _files(root)


def _label_sets(root: Path) -> list[set[str]]:
    with open(root / "labels.csv", newline="") as f:
        return [set(names.split()) for _, names in list(csv.reader(f))[1:]]


@pytest.mark.parametrize(("classes", "objects"), [(2, 1), (3, 2), (20, 4)])
def test_classes_and_objects(tmp_path: Path, classes: int, objects: int) -> None:
    from aepsl.data.synth import synth_classes

    root = make_synth(tmp_path / "d", n=40, size=64, seed=1, classes=classes, objects=objects)
    names = synth_classes(classes)
    assert len(names) == len(set(names)) == classes
    assert names[:5] == SYNTH_CLASSES[: min(5, classes)]
    assert (root / "classes.txt").read_text().split() == list(names)
    sets = _label_sets(root)
    assert all(1 <= len(s) <= objects for s in sets)
    assert set().union(*sets) <= set(names)
    if objects == 1:
        assert all(len(s) == 1 for s in sets)
    else:
        assert max(len(s) for s in sets) > 1
    dataset = load_folder(root)  # labels agree with masks, or loading refuses
    assert dataset.classes == list(names)


def test_twenty_classes_have_distinct_heads_and_all_appear(tmp_path: Path) -> None:
    from aepsl.data.synth import _looks

    heads = np.array([look.head_rgb for look in _looks(20)], float)
    distance = np.linalg.norm(heads[:, None] - heads[None], axis=2) + np.eye(20) * 1e9
    assert distance.min() >= 50
    root = make_synth(tmp_path / "d", n=60, size=64, seed=0, classes=20, objects=4)
    assert len(set().union(*_label_sets(root))) == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": 1},
        {"classes": 21},
        {"classes": 2.0},
        {"objects": 0},
        {"objects": 6},
        {"classes": 2, "objects": 3},
    ],
)
def test_bad_classes_or_objects(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(UserError, match=r"classes|objects"):
        make_synth(tmp_path / "bad", n=8, **kwargs)
    assert not (tmp_path / "bad").exists()


def test_default_objects_with_two_classes_stays_within_them(tmp_path: Path) -> None:
    root = make_synth(tmp_path / "d", n=30, size=64, seed=0, classes=2)
    assert all(1 <= len(s) <= 2 for s in _label_sets(root))


def test_cli_classes_and_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aepsl.cli import main

    root = tmp_path / "cli"
    assert main(["synth", str(root), "--n", "8", "--size", "64", "--classes", "3"]) == 0
    assert (root / "classes.txt").read_text().split() == list(SYNTH_CLASSES[:3])
    assert main(["synth", str(tmp_path / "bad"), "--n", "8", "--objects", "9"]) == 2
    assert "objects per image must be an integer in 1..classes (5)" in capsys.readouterr().err


def _fashion() -> bool:
    from aepsl.data.real import FASHION_MNIST_DIR

    return FASHION_MNIST_DIR.is_dir()


@pytest.mark.skipif(not _fashion(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize(("classes", "objects"), [(2, 1), (10, 3)])
def test_real_classes_and_objects(tmp_path: Path, classes: int, objects: int) -> None:
    from aepsl.data.real import FASHION_CLASSES, REAL_CLASSES, make_real

    root = make_real(tmp_path / "d", n=16, size=64, seed=2, classes=classes, objects=objects)
    names = (root / "classes.txt").read_text().split()
    assert len(names) == classes
    assert set(names) <= set(FASHION_CLASSES.values())
    if classes == 2:
        assert names == ["trouser", "dress"]
    else:
        assert set(names) == set(FASHION_CLASSES.values()) > set(REAL_CLASSES.values())
    sets = _label_sets(root)
    assert all(1 <= len(s) <= objects for s in sets)
    assert load_folder(root).classes == names


@pytest.mark.skipif(not _fashion(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_defaults_unchanged_and_bad_classes(tmp_path: Path) -> None:
    from aepsl.data.real import make_real

    default = make_real(tmp_path / "a", n=6, size=64, seed=0)
    five = make_real(tmp_path / "b", n=6, size=64, seed=0, classes=5)
    assert _files(default) == _files(five)
    with pytest.raises(UserError, match=r"classes must be an integer in 2\.\.10"):
        make_real(tmp_path / "bad", n=6, classes=11)
