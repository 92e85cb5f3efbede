"""CAMs and pseudo labels made elsewhere (issue 17, items 1-3): PSL on a folder of pseudo
labels, CAMs in IRN's format written and read, safe reading of pickled .npy files, erasing on
top of external step-1 CAMs, and the settings hash following the external folders' files."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY_MINE, TINY_TRAIN, overrides

from aepsl.cli import main
from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.external import check_pseudo_labels, read_cam_file, safe_load_npy
from aepsl.io import read_index_png, write_index_png
from aepsl.layout import stage_digests

MINE = overrides(TINY_MINE, "mine.epochs=2")
TRAIN = overrides(TINY_TRAIN, "train.checkpoint_every=2")
TRAIN_IDS = [f"img{i}" for i in range(6)]  # make_folder_dataset(n=8): img6, img7 are val


def _labels_csv(root: Path) -> dict[str, list[int]]:
    names = {"square": 1, "disc": 2}
    rows = (root / "labels.csv").read_text().splitlines()[1:]
    return {r.split(",")[0]: [names[n] for n in r.split(",")[1].split()] for r in rows}


def _irn_read(path: Path) -> dict:
    """IRN's own reader (step/eval_cam.py, step/cam_to_ir_label.py)."""
    return np.load(path, allow_pickle=True).item()


@pytest.fixture(scope="module")
def irn_mined(tmp_path_factory):
    """One step of mining on a tiny dataset, CAMs saved in IRN's format."""
    from conftest import make_folder_dataset

    base = tmp_path_factory.mktemp("external")
    root = make_folder_dataset(base / "data", n=8)
    out = base / "run"
    extra = ["mine.steps=1", "mine.save_cams=true", "mine.cam_format=irn"]
    assert main(["mine", DEMO, f"data.root={root}", *MINE, *extra, "--out", str(out)]) == 0
    return root, out


# ---------------------------------------------------------------- 1. PSL on any pseudo labels


def test_train_on_external_pseudo_labels(folder_dataset, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    shutil.copytree(folder_dataset / "masks", theirs)
    out = tmp_path / "run"
    args = [DEMO, f"data.root={folder_dataset}", f"labels.dir={theirs}", *TRAIN, "--out", str(out)]
    assert main(["run", *args]) == 0
    printed = capsys.readouterr().out
    assert "mine: skipped: labels.dir is set" in printed
    assert f"labels: not built: labels.dir is set; train reads the 4 pseudo labels in {theirs}" in (
        printed
    )
    assert (out / "train" / "model.pt").is_file()
    assert not (out / "mine").exists()
    metrics = json.loads((out / "labels" / "metrics.json").read_text())
    assert metrics["source"] == str(theirs) and metrics["mIoU"] == pytest.approx(1.0)
    assert (out / "report.html").is_file()
    # Changing the folder's contents re-runs training (its files' names, sizes, mtimes).
    assert main(["train", *args]) == 0
    assert "skipped" in capsys.readouterr().out
    label = read_index_png(theirs / "img0.png")
    label[5:8, 5:8] = 255
    write_index_png(theirs / "img0.png", label)
    os.utime(theirs / "img0.png", ns=(1, 1))  # a different mtime whatever the clock's grain
    assert main(["train", *args]) == 0
    assert "settings changed since the last run" in capsys.readouterr().out


def _bad_folder(root: Path, tmp_path: Path) -> Path:
    theirs = tmp_path / "bad"
    shutil.copytree(root / "masks", theirs)
    for image_id in ("img1", "img2", "img3"):
        (theirs / f"{image_id}.png").unlink()
    return theirs


def test_missing_pseudo_labels_one_line(folder_dataset, tmp_path, capsys):
    theirs = _bad_folder(folder_dataset, tmp_path)
    args = [DEMO, f"data.root={folder_dataset}", f"labels.dir={theirs}", *TRAIN]
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"aepsl train: error: {theirs}: 3 pseudo labels missing, e.g. 'img1', 'img2', 'img3'"
    ]
    assert main(["labels", *args, "--out", str(tmp_path / "run2")]) == 2
    assert "3 pseudo labels missing" in capsys.readouterr().err


def test_each_kind_of_fault_is_a_part_of_one_line(folder_dataset, tmp_path):
    from aepsl.config import DataConfig
    from aepsl.data.datasets import load_dataset

    train = load_dataset(DataConfig(root=str(folder_dataset))).split("train")
    theirs = _bad_folder(folder_dataset, tmp_path)
    write_index_png(theirs / "img0.png", np.zeros((30, 32), np.uint8))  # wrong size
    with pytest.raises(UserError) as caught:
        check_pseudo_labels(theirs, train, 2)
    assert str(caught.value) == (  # one line, a part per kind of fault
        f"{theirs}: 3 pseudo labels missing, e.g. 'img1', 'img2', 'img3'; 1 pseudo label of "
        "another size than their image, e.g. 'img0' (32x30, image 32x32)"
    )
    for image_id in ("img1", "img2", "img3"):
        shutil.copy(folder_dataset / "masks" / f"{image_id}.png", theirs)
    shutil.copy(folder_dataset / "masks" / "img0.png", theirs)
    label = read_index_png(theirs / "img2.png")
    label[3, 3] = 7
    write_index_png(theirs / "img2.png", label)
    with pytest.raises(UserError) as caught:
        check_pseudo_labels(theirs, train, 2)
    assert str(caught.value) == (
        f"{theirs}: 1 pseudo label with values outside 0..2 and 255, e.g. 'img2' (7)"
    )


# ---------------------------------------------------------------- 2. CAMs in IRN's format


def test_irn_cams_written_in_irn_format(irn_mined):
    root, out = irn_mined
    labels = _labels_csv(root)
    cams = out / "mine" / "step1" / "cams"
    assert sorted(p.stem for p in cams.glob("*.npy")) == TRAIN_IDS
    assert not list(cams.glob("*.npz"))
    for image_id in TRAIN_IDS:
        record = _irn_read(cams / f"{image_id}.npy")
        assert set(record) == {"keys", "cam", "high_res"}
        assert record["keys"].tolist() == [k - 1 for k in labels[image_id]]  # 0-based
        k = len(labels[image_id])
        assert record["cam"].shape == (k, 4, 4)  # tiny: output stride 8, 32 px images
        assert record["high_res"].shape == (k, 32, 32)
        assert record["high_res"].dtype == np.float32
        peaks = record["high_res"].reshape(k, -1).max(axis=1)
        assert np.all((np.abs(peaks - 1) < 1e-6) | (peaks == 0))
        # IRN's eval_cam.py: background padded at a threshold, argmax, keys + 1
        padded = np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)), constant_values=0.5)
        keys = np.pad(record["keys"] + 1, (1, 0))
        assert set(np.unique(keys[padded.argmax(0)])) <= {0, *labels[image_id]}
        # our reader agrees with theirs
        ours_keys, ours = read_cam_file(cams / f"{image_id}.npy", 2, 10**7)
        assert ours_keys == labels[image_id]
        assert np.array_equal(ours, record["high_res"])


def test_labels_from_a_cam_folder_match_the_mined_regions(irn_mined, tmp_path, capsys):
    """labels.cams_dir thresholds the CAMs as mine does: pseudo labels from the step's IRN
    files are those of the mined regions of that step."""
    root, out = irn_mined
    cams = out / "mine" / "step1" / "cams"
    common = [DEMO, f"data.root={root}", *MINE, "mine.steps=1"]
    assert main(["labels", *common, "mine.save_cams=true", "mine.cam_format=irn",
                 "--out", str(out)]) == 0  # fmt: skip
    theirs = tmp_path / "from_cams"
    assert main(["labels", *common, f"labels.cams_dir={cams}", "--out", str(theirs)]) == 0
    assert "mine" not in {p.name for p in theirs.iterdir()}
    for image_id in TRAIN_IDS:
        expected = read_index_png(out / "labels" / f"{image_id}.png")
        assert np.array_equal(read_index_png(theirs / "labels" / f"{image_id}.png"), expected)
    metrics = json.loads((theirs / "labels" / "metrics.json").read_text())
    assert metrics["regions"] == str(cams)
    capsys.readouterr()
    # `run` skips mine with labels.cams_dir
    from aepsl.mine.stage import run_mine

    config = load_config(DEMO, [f"data.root={root}", f"labels.cams_dir={cams}"])
    assert run_mine(config, tmp_path / "other")["skipped"].startswith("labels.cams_dir is set")


def test_cam_formats_of_the_field(tmp_path):
    """IRN with torch tensors (as make_cam.py saves keys and cam), CLIP-ES, SEAM, ours."""
    high = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    irn = {"keys": torch.tensor([0, 3]), "cam": torch.rand(2, 2, 2), "high_res": high}
    np.save(tmp_path / "irn.npy", irn)
    keys, cams = read_cam_file(tmp_path / "irn.npy", 4, 10**7)
    assert keys == [1, 4] and np.array_equal(cams, high)
    np.save(tmp_path / "clip.npy", {"keys": np.array([2]), "attn_highres": high[:1]})
    assert read_cam_file(tmp_path / "clip.npy", 4, 10**7)[0] == [3]
    np.save(tmp_path / "seam.npy", {1: high[0], 2: high[1]})
    keys, cams = read_cam_file(tmp_path / "seam.npy", 4, 10**7)
    assert keys == [2, 3] and cams.shape == (2, 5, 6)
    np.savez(tmp_path / "ours.npz", keys=np.array([1, 2], np.uint8), cams=high.astype(np.float16))
    assert read_cam_file(tmp_path / "ours.npz", 4, 10**7)[0] == [1, 2]
    np.save(tmp_path / "far.npy", {"keys": np.array([20]), "high_res": high[:1]})
    with pytest.raises(UserError, match=r"class key 20 outside 0\.\.3"):
        read_cam_file(tmp_path / "far.npy", 4, 10**7)


class _Payload:
    """What a hostile .npy holds: a call to a function of the attacker's choice."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_npy_refused_in_one_line(folder_dataset, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cams = tmp_path / "cams"
    cams.mkdir()
    for image_id in TRAIN_IDS[:4]:
        np.save(cams / f"{image_id}.npy", {"keys": _Payload(marker), "high_res": None})
    with pytest.raises(UserError) as caught:
        safe_load_npy(cams / "img0.npy", 10**7)
    assert "refused: its pickle asks for pathlib.Path" in str(caught.value)
    args = [DEMO, f"data.root={folder_dataset}", f"labels.cams_dir={cams}"]
    assert main(["labels", *args, "--out", str(tmp_path / "run")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(err) == 1 and "img0.npy: refused" in err[0] and "could run code" in err[0]
    assert not marker.exists()


# ---------------------------------------------------------------- 3. erasing on external CAMs


def test_mine_on_external_step1_cams(irn_mined, tmp_path, capsys):
    root, first = irn_mined
    cams = first / "mine" / "step1" / "cams"
    out = tmp_path / "run"
    extra = [f"mine.step1_cams={cams}", "mine.steps=2"]
    assert main(["mine", DEMO, f"data.root={root}", *MINE, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"step 1: CAMs of {cams}" in printed
    step1, step2 = out / "mine" / "step1", out / "mine" / "step2"
    assert not (step1 / "classifier.pt").exists() and (step2 / "classifier.pt").is_file()
    for image_id in TRAIN_IDS:  # step 1's regions: the external CAMs thresholded as ours
        expected = read_index_png(first / "mine" / "step1" / "regions" / f"{image_id}.png")
        assert np.array_equal(read_index_png(step1 / "regions" / f"{image_id}.png"), expected)
        union = read_index_png(out / "mine" / "regions" / f"{image_id}.png")
        second = read_index_png(step2 / "regions" / f"{image_id}.png")
        mined = (expected > 0) | (second > 0)
        assert np.array_equal(union > 0, mined)
    metrics = json.loads((out / "mine" / "metrics.json").read_text())
    assert metrics["steps_used"] == [1, 2]
    assert metrics["steps"][0]["train_loss"] is None and metrics["steps"][0]["cams"] == str(cams)
    assert metrics["steps"][1]["train_loss"] > 0
    assert metrics["steps"][1]["union_regions"]["recall"] is not None
    # step 1's seed curve is the external CAMs': the same as the run that made them
    made = json.loads((first / "mine" / "metrics.json").read_text())["seed_mIoU"]["step 1"]
    ours = metrics["seed_mIoU"]["step 1"]
    assert ours["best_mIoU"] == pytest.approx(made["best_mIoU"], abs=0.01)
    assert set(metrics["seed_mIoU"]) == {"step 1", "step 2", "union"}
    # re-running skips (changing the folder's files re-runs: the hash test below)
    assert main(["mine", DEMO, f"data.root={root}", *MINE, *extra, "--out", str(out)]) == 0
    assert "finished for these settings" in capsys.readouterr().out


def _touch(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    ("key", "suffix", "changed"),
    [
        ("labels.dir", ".png", {"labels", "train"}),
        ("labels.cams_dir", ".npy", {"labels", "train"}),
        ("mine.step1_cams", ".npy", {"mine", "labels", "train"}),
    ],
)
def test_changing_an_external_folder_changes_the_hash_chain(tmp_path, key, suffix, changed):
    folder = tmp_path / "external"
    folder.mkdir()
    (folder / f"a{suffix}").write_bytes(b"1")
    config = load_config(None, [f"{key}={folder}"])
    before = stage_digests(config)
    assert stage_digests(config) == before  # the same files: the same hashes
    _touch(folder / f"a{suffix}")
    after = stage_digests(config)
    assert {stage for stage in before if before[stage] != after[stage]} == changed
    (folder / f"b{suffix}").write_bytes(b"2")  # a file added
    assert stage_digests(config)["train"] != after["train"]
    (folder / "notes.txt").write_text("x")  # other files are not read: no change
    assert stage_digests(config) == stage_digests(load_config(None, [f"{key}={folder}"]))


def test_defaults_keep_the_hashes_of_earlier_runs():
    """The new settings at their defaults add nothing to the hashed settings."""
    config = load_config(None)
    assert stage_digests(config) == stage_digests(load_config(None, ["mine.cam_format=npz"]))
    assert (
        stage_digests(config)["mine"]
        != stage_digests(load_config(None, ["mine.cam_format=irn"]))["mine"]
    )
