"""`aepsl prepare-voc` on a tiny VOC 2012 + SBD pair built by hand: the train_aug arithmetic,
VOC's masks winning over SBD's, add-only writes, and one-line errors on bad SBD files."""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from aepsl.cli import main
from aepsl.config import DataConfig
from aepsl.data.datasets import load_dataset, validate
from aepsl.data.voc_prepare import prepare_voc, read_sbd_mask, train_aug_ids
from aepsl.io import read_index_png, write_index_png
from aepsl.labelmap import PALETTE

A, B, C = "2007_000001", "2007_000002", "2007_000003"  # VOC train
D, E = "2008_000010", "2008_000011"  # VOC val
F, H = "2009_000020", "2009_000021"  # SBD train only
G = "2010_000030"  # SBD val only

VOC_TRAIN = [A, B, C]
VOC_VAL = [D, E]
SBD_TRAIN = [B, F, D, H]  # B: also VOC train (VOC's mask wins); D: VOC val (removed)
SBD_VAL = [C, G, E]  # C: also VOC train; E: VOC val (removed)
TRAIN_AUG = sorted([A, B, C, F, G, H])
ALL = sorted({*VOC_TRAIN, *VOC_VAL, *SBD_TRAIN, *SBD_VAL})
SIZE = {i: (7, 10) if k % 2 else (9, 6) for k, i in enumerate(ALL)}  # (height, width)


def _mask(image_id: str, label: int, offset: int = 0) -> np.ndarray:
    h, w = SIZE[image_id]
    mask = np.zeros((h, w), np.uint8)
    mask[1 + offset : 4 + offset, 1:4] = label
    return mask


def voc_mask(image_id: str) -> np.ndarray:
    mask = _mask(image_id, 15)  # person, with VOC's 255 boundary
    mask[0] = 255
    return mask


def sbd_mask(image_id: str) -> np.ndarray:
    return _mask(image_id, 7, offset=1)  # car, no boundary: SBD's class maps have none


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """The layout of SBD's cls/<id>.mat: a 1x1 struct GTcls with Segmentation (and more)."""
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg, "CategoriesPresent": present}})


def make_pair(root: Path) -> tuple[Path, Path]:
    voc = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (voc / d).mkdir(parents=True)
    for k, image_id in enumerate(ALL):
        h, w = SIZE[image_id]
        Image.new("RGB", (w, h), (k * 20, 80, 0)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    for image_id in VOC_TRAIN + VOC_VAL:
        write_index_png(voc / "SegmentationClass" / f"{image_id}.png", voc_mask(image_id))
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN + VOC_VAL))
    (voc / "Annotations" / f"{A}.xml").write_text("<annotation/>")

    sbd = root / "benchmark_RELEASE"
    (sbd / "dataset" / "cls").mkdir(parents=True)
    for image_id in SBD_TRAIN + SBD_VAL:
        write_sbd_mat(sbd / "dataset" / "cls" / f"{image_id}.mat", sbd_mask(image_id))
    (sbd / "dataset" / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (sbd / "dataset" / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return voc, sbd


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path / "data")


def run(capsys, voc: Path, sbd: Path, warned: list[str] | None = None) -> tuple[int, str, str]:
    """Exit status, stdout, and stderr without the progress bar (it ends with a newline);
    warnings go to `warned`."""
    with warnings.catch_warnings(record=True) as caught:
        code = main(["prepare-voc", "--voc", str(voc), "--sbd", str(sbd)])
    if warned is not None:
        warned += [str(w.message) for w in caught]
    captured = capsys.readouterr()
    lines = captured.err.split("\n")
    err = "\n".join(line for line in lines if "SegmentationClassAug: " not in line)
    return code, captured.out, err


def test_sbd_mat_layout_is_read_as_sbd_stores_it(tmp_path):
    path = tmp_path / "x.mat"
    seg = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_sbd_mat(path, seg)
    raw = scipy.io.loadmat(path)
    assert raw["GTcls"].shape == (1, 1)  # a MATLAB struct, as in benchmark_RELEASE
    assert np.array_equal(raw["GTcls"][0]["Segmentation"][0], seg)
    assert np.array_equal(read_sbd_mask(path), seg)


def test_train_aug_arithmetic():
    assert train_aug_ids(SBD_TRAIN, SBD_VAL, VOC_TRAIN, VOC_VAL) == TRAIN_AUG
    # the val ids leave even when only SBD lists them
    assert train_aug_ids(["x", "v"], [], [], ["v"]) == ["x"]


def test_prepare_voc_writes_masks_and_list(pair, capsys):
    voc, sbd = pair
    root = voc.parent.parent
    # One mask already there (say from an earlier download): left alone, counted.
    kept = np.full(SIZE[F], 3, np.uint8)
    write_index_png(voc / "SegmentationClassAug" / f"{F}.png", kept)
    before = tree_hashes(root)

    warned: list[str] = []
    code, out, err = run(capsys, voc, sbd, warned)
    assert code == 0, err
    assert len(warned) == 1 and "train_aug has 6 ids, not the 10582" in warned[0]  # not official
    assert f"{voc / 'ImageSets/Segmentation/train_aug.txt'}: 6 ids (written)" in out
    assert "wrote 5 masks from VOC and 2 from SBD; 1 already there" in out

    after = tree_hashes(root)
    assert {k: after[k] for k in before} == before  # nothing existing was modified
    added = sorted(set(after) - set(before))
    assert added == sorted(
        ["VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt"]
        + [f"VOCdevkit/VOC2012/SegmentationClassAug/{i}.png" for i in ALL if i != F]
    )
    sets = voc / "ImageSets" / "Segmentation"
    assert (sets / "train_aug.txt").read_text() == "".join(f"{i}\n" for i in TRAIN_AUG)

    aug = voc / "SegmentationClassAug"
    for image_id in ALL:
        with Image.open(aug / f"{image_id}.png") as image:
            assert image.mode == "P" and image.getpalette()[:48] == PALETTE[:48]
        got = read_index_png(aug / f"{image_id}.png")
        if image_id == F:
            expected = kept
        elif image_id in VOC_TRAIN + VOC_VAL:  # VOC wins over SBD (B, C, D, E), pixel for pixel
            expected = voc_mask(image_id)
        else:
            expected = sbd_mask(image_id)
        assert np.array_equal(got, expected), image_id

    # A second run adds nothing and changes nothing.
    code, out, err = run(capsys, voc, sbd)
    assert code == 0, err
    assert "wrote 0 masks from VOC and 0 from SBD; 8 already there" in out
    assert "6 ids (existing)" in out
    assert tree_hashes(root) == after


def test_result_reads_as_voc_train_aug(pair, capsys):
    voc, sbd = pair
    with pytest.warns(UserWarning, match="train_aug has 6 ids"):
        counts = prepare_voc(voc, sbd)
    assert counts["train_aug"] == 6 and counts["masks_from_sbd"] == 3
    data = load_dataset(DataConfig(format="voc", root=str(voc.parent)))
    samples = {s.id: s for s in data.split("train_aug")}
    assert sorted(samples) == TRAIN_AUG
    assert all(s.mask is not None for s in samples.values())
    assert samples[B].mask.parent.name == "SegmentationClass" and samples[B].labels == (15,)
    assert samples[G].mask.parent.name == "SegmentationClassAug" and samples[G].labels == (7,)
    validate(data, "train_aug")

    argv = ["data-info", "data.format=voc", f"data.root={voc}", "data.train_split=train_aug"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("train_aug "))
    assert row.split()[1:3] == ["6", "6"]  # images, masks


def test_existing_list_with_other_ids_is_refused(pair, capsys):
    voc, sbd = pair
    path = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    path.write_text(f"{A}\n{D}\n")
    before = tree_hashes(voc)
    code, _, err = run(capsys, voc, sbd)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"aepsl prepare-voc: error: {path}: exists with different ids")
    assert tree_hashes(voc) == before  # refused before writing anything


def test_existing_list_with_same_ids_is_kept(pair, capsys):
    voc, sbd = pair
    path = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    text = "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in TRAIN_AUG[::-1])
    path.write_text(text)
    code, out, err = run(capsys, voc, sbd)
    assert code == 0, err
    assert "6 ids (existing)" in out
    assert path.read_text() == text


def test_missing_mat_is_one_line_and_writes_nothing(pair, capsys):
    voc, sbd = pair
    missing = sbd / "dataset" / "cls" / f"{H}.mat"
    missing.unlink()
    before = tree_hashes(voc)
    code, _, err = run(capsys, voc, sbd)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"aepsl prepare-voc: error: {missing}: SBD mask not found")
    assert tree_hashes(voc) == before


def test_missing_mat_not_needed_when_voc_has_the_mask(pair, capsys):
    voc, sbd = pair
    (sbd / "dataset" / "cls" / f"{B}.mat").unlink()  # VOC's SegmentationClass has B
    code, _, err = run(capsys, voc, sbd)
    assert code == 0, err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a mat file at all", "cannot read SBD mask"),
        (b"", "cannot read SBD mask"),
        ("other_struct", "not an SBD class mask"),
        ("bad_label", "label 40 is out of range"),
    ],
)
def test_corrupt_mat_is_one_line_naming_it(pair, capsys, content, message):
    voc, sbd = pair
    bad = sbd / "dataset" / "cls" / f"{G}.mat"
    if content == "other_struct":
        scipy.io.savemat(bad, {"GTinst": {"Segmentation": sbd_mask(G)}})
    elif content == "bad_label":
        write_sbd_mat(bad, np.full(SIZE[G], 40, np.uint8))
    else:
        bad.write_bytes(content)
    code, _, err = run(capsys, voc, sbd)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"aepsl prepare-voc: error: {bad}: {message}")
    assert not (voc / "ImageSets" / "Segmentation" / "train_aug.txt").exists()
    # Masks written before the bad file stay (complete, atomic); a fixed re-run finishes the job.
    write_sbd_mat(bad, sbd_mask(G))
    code, out, err = run(capsys, voc, sbd)
    assert code == 0, err
    assert "6 ids (written)" in out
    assert np.array_equal(read_index_png(voc / "SegmentationClassAug" / f"{G}.png"), sbd_mask(G))
    assert not list((voc / "SegmentationClassAug").glob(".*"))  # no temporary files left


def test_mask_size_must_match_image(pair, capsys):
    voc, sbd = pair
    bad = sbd / "dataset" / "cls" / f"{H}.mat"
    write_sbd_mat(bad, np.zeros((3, 3), np.uint8))
    code, _, err = run(capsys, voc, sbd)
    assert code == 2
    assert err.startswith(f"aepsl prepare-voc: error: {bad}: mask is 3x3 but")


def test_missing_folders_are_clear(pair, tmp_path, capsys):
    voc, sbd = pair
    code, _, err = run(capsys, voc, tmp_path / "nowhere")
    assert code == 2 and "--sbd must be SBD's benchmark_RELEASE folder" in err
    code, _, err = run(capsys, tmp_path / "nowhere", sbd)
    assert code == 2 and "--voc must be VOCdevkit/VOC2012" in err
    (sbd / "dataset" / "val.txt").unlink()
    code, _, err = run(capsys, voc, sbd)
    assert code == 2 and f"{sbd / 'dataset' / 'val.txt'}: split file not found" in err


def test_accepts_vocdevkit_and_dataset_folders(pair, capsys):
    voc, sbd = pair
    shutil.copytree(sbd, sbd.parent / "copy")
    code, _, err = run(capsys, voc.parent, sbd.parent / "copy" / "dataset")
    assert code == 0, err
