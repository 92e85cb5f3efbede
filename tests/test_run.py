"""`aepsl run`: the whole method in one command; skips on re-run, re-runs what a changed setting
touches, and resumes after SIGKILL to the same outputs as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY_MINE, TINY_TRAIN, overrides

from aepsl.cli import main
from aepsl.io import read_index_png
from aepsl.models.saved import read_model_file

# Larger than the other tiny runs: 48-pixel images, 4 epochs, 24 iterations.
TINY = overrides(
    TINY_MINE,
    TINY_TRAIN,
    "mine.epochs=4",
    "data.image_size=48",
    "mine.visualise=2",
    "train.iterations=24",
    "train.crop_size=48",
    "train.batch_size=4",
    "train.checkpoint_every=4",
)


def _command(root: Path, out: Path, *extra: str) -> list[str]:
    return ["run", DEMO, f"data.root={root}", *TINY, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import make_folder_dataset

    return make_folder_dataset(tmp_path_factory.mktemp("run") / "data", n=24, size=48)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run, in a subprocess like the killed ones (same threads, same state)."""
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(
        [sys.executable, "-m", "aepsl", *_command(dataset, out)], check=True, capture_output=True
    )
    return out


def _outputs(out: Path) -> dict[str, object]:
    """Everything a run produces that must not depend on interruptions."""
    found: dict[str, object] = {}
    for folder in ("mine/regions", "mine/step1/regions", "labels", "predict", "predict_crf"):
        for path in sorted((out / folder).glob("*.png")):
            found[f"{folder}/{path.name}"] = read_index_png(path)
    for step in (1, 2, 3):
        state = read_model_file(out / f"mine/step{step}/classifier.pt")[1]
        found.update({f"step{step}.{k}": v for k, v in state.items()})
    state = read_model_file(out / "train" / "model.pt")[1]
    found.update({f"segnet.{k}": v for k, v in state.items()})
    found["train metrics"] = json.loads((out / "train" / "metrics.json").read_text())
    found["mine losses"] = [
        s["train_loss"] for s in json.loads((out / "mine/metrics.json").read_text())["steps"]
    ]
    return found


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_run_writes_every_stage_and_the_report(reference):
    assert (reference / "report.html").is_file()
    metrics = json.loads((reference / "train" / "metrics.json").read_text())
    assert 0 <= metrics["without_crf"]["mIoU"] <= 1
    assert sorted(p.stem for p in (reference / "predict").glob("*.png")) == ["img22", "img23"]
    for stage in ("mine", "labels", "train", "predict"):
        assert json.loads((reference / stage / "manifest.json").read_text())["complete"]


@pytest.mark.parametrize(
    ("stage_file", "kill"),
    [
        ("mine/step2/checkpoint.pt", signal.SIGKILL),
        ("train/checkpoint.pt", signal.SIGKILL),
        ("mine/step2/checkpoint.pt", signal.SIGTERM),
        ("train/checkpoint.pt", signal.SIGTERM),
    ],
)
def test_killed_run_resumes_to_identical_outputs(dataset, reference, tmp_path, stage_file, kill):
    """SIGKILL (no warning) or SIGTERM (what a cluster sends first: one line, exit 143), then
    the same command: the same regions, pseudo labels, weights and predictions, and model
    files identical to the byte."""
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "aepsl", *_command(dataset, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / stage_file).exists():
        assert process.poll() is None, "the run ended before the stage under test checkpointed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, kill)
    _, err = process.communicate()
    if kill == signal.SIGTERM:
        assert process.returncode == 143
        assert err.splitlines()[-1] == "aepsl run: terminated; re-run the same command to resume"
    assert main(_command(dataset, out)) == 0
    _assert_same(_outputs(reference), _outputs(out))  # every output PNG decodes, too
    for model in ("mine/step3/classifier.pt", "train/model.pt"):
        assert (out / model).read_bytes() == (reference / model).read_bytes(), model


def test_rerun_skips_and_changed_setting_reruns_downstream(dataset, reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*.png")}
    assert main(_command(dataset, reference)) == 0
    printed = capsys.readouterr().out
    for stage in ("mine", "labels", "train", "predict"):
        assert f"{stage}: " in printed and "skipped" in printed
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "report" not in str(p))

    assert main(_command(dataset, reference, "labels.bg_threshold=0.3")) == 0
    printed = capsys.readouterr().out
    assert "mine: finished for these settings" in printed
    assert "labels: finished" not in printed and "train: finished" not in printed
    assert json.loads((reference / "labels/metrics.json").read_text())["bg_threshold"] == 0.3
    mined = reference / "mine" / "regions" / "img0.png"
    assert mined.stat().st_mtime_ns == before[mined]
