"""Pseudo-label fusion rules, branch by branch, and `aepsl labels` end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO

from aepsl.cli import main
from aepsl.config import load_config
from aepsl.io import read_index_png, write_index_png
from aepsl.labels.fusion import (
    background_from_cams,
    background_from_saliency,
    fill_from_cams,
    fuse_pseudo_label,
    label_probabilities,
    merge_crf_label,
)

# One pixel per case: mined, conflict, unmined low saliency, unmined high saliency,
# mined with low saliency, conflict with low saliency.
REGIONS = np.array([[3, 255, 0, 0, 5, 255]], np.uint8)
LOW = np.array([[False, False, True, False, True, True]])


def test_fusion_default_mined_wins():
    assert fuse_pseudo_label(REGIONS, LOW).tolist() == [[3, 255, 0, 255, 5, 255]]


def test_fusion_background_wins_when_asked():
    assert fuse_pseudo_label(REGIONS, LOW, "background").tolist() == [[3, 255, 0, 255, 0, 0]]


def test_fusion_shape_mismatch():
    with pytest.raises(ValueError):
        fuse_pseudo_label(REGIONS, LOW[:, :3])


def test_background_sources():
    saliency = np.array([[0.1, 0.3, 0.9]])
    assert background_from_saliency(saliency, 0.3).tolist() == [[True, False, False]]
    cams = np.array([[[0.1, 0.5, 0.0]], [[0.1, 0.0, 0.3]]])
    assert background_from_cams(cams, 0.2).tolist() == [[True, False, False]]
    assert background_from_cams(np.zeros((0, 1, 3)), 0.2).all()


def test_fill_from_cams():
    """Unlabelled, not background, a CAM at the threshold: the strongest tag; else as it was."""
    labels = np.array([[3, 255, 255, 255, 255, 0]], np.uint8)
    background = np.array([[False, False, False, False, True, True]])
    cams = np.array(
        [
            [[0.9, 0.6, 0.2, 0.1, 0.9, 0.9]],  # tag 3
            [[0.1, 0.7, 0.3, 0.2, 0.1, 0.1]],  # tag 5
        ],
        np.float32,
    )
    filled = fill_from_cams(labels, cams, [3, 5], background, 0.3)
    assert filled.tolist() == [[3, 5, 5, 255, 255, 0]] and filled.dtype == np.uint8
    assert fill_from_cams(labels, cams[:0], [], background, 0.3).tolist() == labels.tolist()
    with pytest.raises(ValueError):
        fill_from_cams(labels, cams, [3], background, 0.3)


def test_label_probabilities():
    """Labelled pixels: `confidence` on their class, the rest shared; unlabelled: uniform."""
    labels = np.array([[0, 4, 255]], np.uint8)
    probs = label_probabilities(labels, [0, 2, 4], 0.7)
    assert probs.shape == (3, 1, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[:, 0, 0], [0.7, 0.15, 0.15])
    np.testing.assert_allclose(probs[:, 0, 1], [0.15, 0.15, 0.7])
    np.testing.assert_allclose(probs[:, 0, 2], [1 / 3] * 3)
    np.testing.assert_allclose(probs.sum(0), 1, rtol=1e-6)
    assert label_probabilities(labels[:, [0, 2]], [0], 0.7).shape == (1, 1, 2)
    with pytest.raises(ValueError, match=r"\[4\] are not among"):
        label_probabilities(labels, [0, 2], 0.7)
    with pytest.raises(ValueError, match="confidence"):
        label_probabilities(labels, [0, 4], 1.0)


def test_merge_crf_label():
    labels = np.array([[0, 4, 255, 255]], np.uint8)
    index = np.array([[1, 0, 1, 0]])  # into classes [0, 4]
    assert merge_crf_label(labels, index, [0, 4], fill=False).tolist() == [[4, 0, 255, 255]]
    assert merge_crf_label(labels, index, [0, 4], fill=True).tolist() == [[4, 0, 4, 0]]


def test_labels_crf_moves_edges_to_the_image(tmp_path):
    """A square object whose pseudo label is a band too wide, with an unlabelled ring: the CRF
    on the label pulls the edge back to the image's and `fill` labels the ring."""
    from aepsl.data.types import Sample
    from aepsl.io import write_png
    from aepsl.labels.stage import _crf_label

    image = np.full((48, 48, 3), 30, np.uint8)
    image[12:36, 12:36] = 220
    write_png(tmp_path / "im.png", image)
    truth = np.zeros((48, 48), np.uint8)
    truth[12:36, 12:36] = 3
    label = np.zeros((48, 48), np.uint8)
    label[10:38, 10:38] = 255  # unsure ring
    label[14:34, 8:34] = 3  # too far left by 4 columns
    sample = Sample("im", tmp_path / "im.png", (3,))
    for mode in ("refine", "fill"):
        config = load_config(DEMO, [f"labels.crf={mode}", "data.root=."])
        out = _crf_label(config, sample, label)
        labelled = label != 255
        wrong_before = (label[labelled] != truth[labelled]).sum()
        assert (out[labelled] != truth[labelled]).sum() < wrong_before / 4
        if mode == "refine":
            assert (out[~labelled] == 255).all()
        else:
            assert 255 not in out and (out != truth).mean() < 0.02


def _fake_mine(root: Path, out: Path) -> None:
    """Regions as if mined: the ground truth's objects eroded to their inner half."""
    for mask_path in (root / "masks").glob("*.png"):
        mask = read_index_png(mask_path)
        regions = np.where(mask == 255, 0, mask)
        regions[:, ::2] = 0
        write_index_png(out / "mine" / "regions" / mask_path.name, regions)


@pytest.mark.parametrize("source", ["builtin", "dir"])
def test_labels_stage(folder_dataset, tmp_path, source):
    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    if source == "dir":  # a perfect saliency map: the ground-truth foreground
        for mask_path in (folder_dataset / "masks").glob("*.png"):
            fg = ((read_index_png(mask_path) % 255) > 0).astype(np.uint8) * 255
            write_index_png(folder_dataset / "saliency" / mask_path.name, fg)
    code = main(
        [
            "labels",
            DEMO,
            f"data.root={folder_dataset}",
            f"saliency.source={source}",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "labels" / "metrics.json").read_text())
    assert metrics["saliency_source"] == source
    assert 0 < metrics["labelled_fraction"] <= 1
    if source == "dir":
        assert metrics["mIoU"] == pytest.approx(1.0)
    label = read_index_png(out / "labels" / "img2.png")
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 255}
    assert (out / "labels" / "vis" / "img0.png").is_file()
    if source == "builtin":
        assert (out / "saliency" / "img0.png").is_file()


def test_labels_needs_mine_output(folder_dataset, tmp_path, capsys):
    code = main(["labels", DEMO, f"data.root={folder_dataset}", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "run `aepsl mine`" in capsys.readouterr().err


def test_missing_saliency_map_is_clear(folder_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    code = main(
        ["labels", DEMO, f"data.root={folder_dataset}", "saliency.source=dir", "--out", str(out)]
    )
    assert code == 2
    assert "saliency map missing" in capsys.readouterr().err


def test_cam_background_needs_saved_cams(folder_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    code = main(
        ["labels", DEMO, f"data.root={folder_dataset}", "saliency.source=none", "--out", str(out)]
    )
    assert code == 2
    assert "mine.save_cams=true" in capsys.readouterr().err


def test_labels_workers_write_the_same_files(folder_dataset, tmp_path, capsys):
    """labels.workers=2 (a pool of processes) writes what one process does, byte for byte, and
    a fault in a worker is the same one-line error."""
    written = {}
    for workers in (1, 2):
        out = tmp_path / f"run{workers}"
        _fake_mine(folder_dataset, out)
        argv = ["labels", DEMO, f"data.root={folder_dataset}", f"labels.workers={workers}"]
        assert main([*argv, "--out", str(out)]) == 0
        written[workers] = {p.name: p.read_bytes() for p in (out / "labels").glob("*.png")}
    assert written[1] == written[2] and len(written[1]) == 4  # the training images
    out = tmp_path / "broken"
    _fake_mine(folder_dataset, out)
    (out / "mine" / "regions" / "img3.png").unlink()
    argv = ["labels", DEMO, f"data.root={folder_dataset}", "labels.workers=2", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"aepsl labels: error: {out / 'mine' / 'regions' / 'img3.png'}: mined regions missing; "
        "run `aepsl mine` with this --out first"
    )


def test_labels_workers_keep_the_commands_pixel_limit():
    """A spawned worker starts with the default data.max_pixels: the command's is passed on."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from aepsl.workers import worker_setup

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, context, worker_setup, (True, 123)) as pool:
        limit = pool.submit(eval, "__import__('aepsl.io').io._max_pixels").result()
    assert limit == 123


def test_labels_stage_with_crf(folder_dataset, tmp_path):
    """labels.crf=fill through the command: every pixel labelled, with the image's tags only,
    recorded in metrics.json; the setting is in the labels' settings hash only when set."""
    from aepsl.layout import stage_digests, stage_settings

    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    argv = ["labels", DEMO, f"data.root={folder_dataset}", "labels.crf=fill", "labels.workers=2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads((out / "labels" / "metrics.json").read_text())["crf"] == "fill"
    label = read_index_png(out / "labels" / "img2.png")
    assert 255 not in label and set(np.unique(label).tolist()) <= {0, 1, 2}
    modes = ("none", "refine", "fill")
    configs = {c: load_config(DEMO, ["data.root=.", f"labels.crf={c}"]) for c in modes}
    assert len({stage_digests(c)["labels"] for c in configs.values()}) == 3
    assert "crf" not in stage_settings(configs["none"])["labels"]["labels"]


@pytest.mark.parametrize("fault", ["size", "tags"])
def test_regions_that_do_not_fit_their_image_are_one_line(folder_dataset, tmp_path, capsys, fault):
    """Stale mined regions (another size, or a class the image is no longer tagged with) stop
    the stage with a line naming the file, with or without the CRF."""
    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    path = out / "mine" / "regions" / "img2.png"
    regions = read_index_png(path)
    bad = regions[:-2] if fault == "size" else np.where(regions == 0, 7, regions)  # no tag 7
    write_index_png(path, bad.astype(np.uint8))
    argv = ["labels", DEMO, f"data.root={folder_dataset}", "labels.workers=1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    why = "mined regions are" if fault == "size" else "that the image is not tagged with"
    assert err.startswith(f"aepsl labels: error: {path}: ") and why in err


def test_labels_crf_leaves_an_unlabelled_image_unlabelled(tmp_path):
    from aepsl.data.types import Sample
    from aepsl.labels.stage import _crf_label

    config = load_config(DEMO, ["labels.crf=fill", "data.root=."])
    label = np.full((8, 8), 255, np.uint8)
    sample = Sample("x", tmp_path / "missing.png", (1,))  # not read: nothing to refine
    assert (_crf_label(config, sample, label) == 255).all()


def _fake_step_cams(root: Path, out: Path, steps: int) -> None:
    """Every step's CAMs as mining keeps them: 1 on the ground truth's object of each tag."""
    mine = out / "mine"
    (mine / "metrics.json").write_text(json.dumps({"steps_used": list(range(1, steps + 1))}))
    from aepsl.data.datasets import load_dataset
    from aepsl.mine.extract import _save_npz

    config = load_config(DEMO, [f"data.root={root}"])
    for sample in load_dataset(config.data).split(config.data.train_split):
        mask = read_index_png(sample.mask)
        keys = np.array(sorted(sample.labels), np.uint8)
        cams = np.stack([(mask == k).astype(np.float16) for k in keys])
        for step in range(1, steps + 1):
            _save_npz(out / "mine" / f"step{step}" / "cams" / f"{sample.id}.npz", keys, cams)


def test_labels_stage_with_salient_fill(folder_dataset, tmp_path, capsys):
    """labels.salient_fill through the command: with a perfect saliency map and CAMs on the
    objects, the salient pixels mining left out get their object's class (mIoU 1, every pixel
    labelled); in the hash only when set; mining keeps the CAMs for it; missing CAMs are one
    line."""
    from aepsl.layout import stage_digests, stage_settings

    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    for mask_path in (folder_dataset / "masks").glob("*.png"):
        fg = ((read_index_png(mask_path) % 255) > 0).astype(np.uint8) * 255
        write_index_png(folder_dataset / "saliency" / mask_path.name, fg)
    argv = ["labels", DEMO, f"data.root={folder_dataset}", "saliency.source=dir"]
    argv += ["labels.salient_fill=true", "--out", str(out)]
    _fake_step_cams(folder_dataset, out, 2)
    step2 = out / "mine" / "step2" / "cams"
    step2.rename(out / "cams2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"aepsl labels: error: {step2}: labels.salient_fill needs the CAMs of every mining "
        f"step used; delete the folder {out / 'mine'} and run `aepsl mine` again"
    )
    (out / "mine" / "metrics.json").write_text(json.dumps({"steps_used": [1]}))  # 2 stopped
    assert main(argv) == 0
    (out / "cams2").rename(step2)
    (out / "mine" / "metrics.json").write_text(json.dumps({"steps_used": [1, 2]}))
    shutil.rmtree(out / "labels")
    assert main(argv) == 0
    metrics = json.loads((out / "labels" / "metrics.json").read_text())
    assert metrics["salient_fill"] == {"threshold": 0.3}
    assert metrics["mIoU"] == pytest.approx(1.0) and metrics["labelled_fraction"] == 1.0
    plain, fill, saved = (
        load_config(DEMO, ["data.root=.", *extra])
        for extra in ([], ["labels.salient_fill=true"], ["mine.save_cams=true"])
    )
    assert "salient_fill" not in stage_settings(plain)["labels"]["labels"]
    assert stage_digests(fill)["labels"] != stage_digests(plain)["labels"]
    assert fill.keeps_cams() and not plain.keeps_cams()
    assert stage_digests(fill)["mine"] == stage_digests(saved)["mine"]


def test_label_breakdown_script(folder_dataset, tmp_path):
    """benchmarks/label_breakdown.py on a labelled run: object pixels split into shares that sum
    to 1, and the fill's rows with CAMs on the objects fully precise."""
    import subprocess
    import sys

    out = tmp_path / "run"
    _fake_mine(folder_dataset, out)
    _fake_step_cams(folder_dataset, out, 2)
    argv = [f"data.root={folder_dataset}", "labels.workers=1"]
    assert main(["labels", DEMO, *argv, "--out", str(out)]) == 0
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "label_breakdown.py"
    result = subprocess.run(
        [sys.executable, str(script), DEMO, "--out", str(out), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    shares = [float(w) for w in lines[1].replace(",", " ").split() if w[0].isdigit()]
    assert sum(shares[:4]) == pytest.approx(1, abs=0.002)
    fills = [line.split() for line in lines[4:]]
    assert len(fills) == 8 and all(float(row[-2]) in (0.0, 1.0) for row in fills)
