"""Never lose or misreport data: the dataset is never written to, inputs made with other
settings stop the stage that reads them, damaged run files are one line saying what to do, and
a full disk is one line, with nothing half-written and the run resumable."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO, TINY_MINE, TINY_TRAIN, overrides

from aepsl.cli import main

TINY = overrides(TINY_MINE, TINY_TRAIN, "mine.steps=2", "train.checkpoint_every=2")


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["mine", "labels", "train", "run"])
@pytest.mark.parametrize("where", [".", "..", "images", "masks/deeper", "splits"])
def test_out_into_the_dataset_is_refused_before_any_work(folder_dataset, command, where, capsys):
    before = _tree(folder_dataset.parent)
    out = folder_dataset / where
    argv = [command, DEMO, f"data.root={folder_dataset}", *TINY, "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "aepsl never writes into a dataset" in line and str(out) in line
    assert _tree(folder_dataset.parent) == before


def test_a_run_folder_under_the_dataset_root_is_fine(folder_dataset):
    before = _tree(folder_dataset)
    out = folder_dataset / "runs" / "a"
    assert main(["mine", DEMO, f"data.root={folder_dataset}", *TINY, "--out", str(out)]) == 0
    after = _tree(folder_dataset)
    assert {k: v for k, v in after.items() if not k.startswith("runs")} == before


def test_synth_into_a_folder_that_is_not_empty_needs_force(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["synth", str(tmp_path), "--n", "4", "--size", "48"]) == 2
    assert "folder is not empty" in _one_error_line(capsys.readouterr().err)
    assert main(["synth", str(tmp_path), "--n", "4", "--size", "48", "--force"]) == 0
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, copied by each test that damages it."""
    from conftest import make_folder_dataset

    base = tmp_path_factory.mktemp("sacred")
    root = make_folder_dataset(base / "data", n=8)
    out = base / "run"
    assert main(["run", DEMO, f"data.root={root}", *TINY, "--out", str(out)]) == 0
    return root, out


def test_a_stage_on_inputs_made_with_other_settings_stops(finished, tmp_path, capsys):
    root, done = finished
    out = shutil.copytree(done, tmp_path / "run")
    config_before = (out / "config.yaml").read_text()
    argv = ["labels", DEMO, f"data.root={root}", *TINY, "mine.threshold=0.7", "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert (
        f"{out / 'mine'}: made with other settings than these (mine.threshold: 0.8 -> 0.7)" in line
    )
    assert (out / "config.yaml").read_text() == config_before  # claims nothing it did not make
    argv = ["train", DEMO, f"data.root={root}", *TINY, "labels.bg_threshold=0.3", "--out"]
    assert main([*argv, str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{out / 'labels'}: made with other settings than these (labels.bg_threshold: 0.2 -> 0.3)"
        in err
    )
    mine_config = (out / "mine" / "config.yaml").read_text()
    assert "threshold: 0.8" in mine_config  # each stage folder: the settings that made it


DAMAGED = [
    "mine/manifest.json",
    "labels/manifest.json",
    "train/manifest.json",
    "predict/manifest.json",
    "mine/metrics.json",
    "labels/metrics.json",
    "train/metrics.json",
    "mine/mean_pixel.json",
    "mine/step1/done.json",
    "mine/step2/train.json",
]


@pytest.mark.parametrize("damage", ["empty", "truncated", "wrong type"])
@pytest.mark.parametrize("name", DAMAGED)
def test_a_damaged_run_file_is_one_line_saying_what_to_do(finished, tmp_path, name, damage, capsys):
    """Re-running on a damaged file either recovers or stops with one line naming the file and
    what to do; never a traceback. Following the advice then finishes the run."""
    root, done = finished
    out = shutil.copytree(done, tmp_path / "run")
    path = out / name
    text = path.read_text()
    broken = {"empty": "", "truncated": text[: len(text) // 2], "wrong type": "[1, 2]"}[damage]
    path.write_text(broken)
    argv = ["run", DEMO, f"data.root={root}", *TINY, "--out", str(out)]
    code = main(argv)
    if code:
        assert code == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(path) in line and "delete the folder" in line, line
        shutil.rmtree(line.split("delete the folder ")[1].split(" and ")[0])
        code = main(argv)
    assert code == 0, capsys.readouterr().err


def test_finished_stage_with_files_gone_runs_again(finished, tmp_path, capsys):
    """The advice never loops: a stage marked finished whose outputs are gone runs again."""
    root, done = finished
    out = shutil.copytree(done, tmp_path / "run")
    shutil.rmtree(out / "mine" / "regions")
    assert main(["labels", DEMO, f"data.root={root}", *TINY, "--out", str(out)]) == 0
    assert main(["mine", DEMO, f"data.root={root}", *TINY, "--out", str(out)]) == 0
    assert "marked finished but" in capsys.readouterr().out
    assert len(list((out / "mine" / "regions").glob("*.png"))) == 6


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def test_full_disk_is_one_line_and_the_run_resumes(folder_dataset, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "300k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        argv = [sys.executable, "-m", "aepsl", "run", DEMO, f"data.root={folder_dataset}", *TINY]
        result = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        line = _one_error_line(result.stderr)
        assert "no space left on device" in line and str(out) in line
        leftovers = [p for p in out.rglob(".*") if p.is_file()]
        assert not leftovers, leftovers  # no temporary half-written file
        for path in out.rglob("*.json"):
            json.loads(path.read_text())  # every file there is whole
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert (out / "report.html").is_file()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_predict_redoes_what_another_checkpoint_wrote(finished, tmp_path, capsys):
    """Predictions already in --out count only when this checkpoint and these settings made
    them; a folder of PNGs aepsl did not write, or the --images folder itself, is refused."""
    import torch

    root, done = finished
    model = done / "train" / "model.pt"
    other = tmp_path / "other.pt"
    state = torch.load(model, weights_only=True)
    state["state_dict"]["classifier.bias"] += 1.0
    torch.save(state, other)
    out = tmp_path / "pred"
    base = ["predict", DEMO, f"data.root={root}", *TINY, "--split", "val", "--out", str(out)]
    assert main([*base, "--checkpoint", str(model)]) == 0
    assert "wrote 2 predictions" in capsys.readouterr().out
    assert main([*base, "--checkpoint", str(model)]) == 0
    assert "wrote 0 predictions" in capsys.readouterr().out  # 2 already there: kept
    assert main([*base, "--checkpoint", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 predictions" in printed and "already there" not in printed

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "img6.png").write_bytes((out / "img6.png").read_bytes())
    argv = ["predict", DEMO, *TINY, "--checkpoint", str(model), "--images", str(root / "images")]
    assert main([*argv, "--out", str(foreign)]) == 2
    assert "did not write (no manifest.json)" in _one_error_line(capsys.readouterr().err)
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    argv = ["predict", DEMO, *TINY, "--checkpoint", str(model), "--images", str(images)]
    assert main([*argv, "--out", str(images)]) == 2
    assert "--out is the --images folder" in _one_error_line(capsys.readouterr().err)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_ctrl_c_during_the_crf_workers_is_one_line(finished, tmp_path):
    """Ctrl-C reaches the whole process group: the CRF workers leave it to the main process,
    which prints one line; no traceback per worker."""
    import os
    import signal
    import time

    root, done = finished
    images = tmp_path / "images"
    images.mkdir()
    for k in range(200):  # enough work that the pool is still busy when Ctrl-C comes
        shutil.copy(root / "images" / "img0.png", images / f"a{k}.png")
    argv = [sys.executable, "-m", "aepsl", "predict", DEMO, *TINY, "crf.workers=2", "--crf"]
    argv += ["--checkpoint", str(done / "train" / "model.pt"), "--images", str(images)]
    process = subprocess.Popen(
        [*argv, "--out", str(tmp_path / "pred")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell's background job inherits SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while len(_children(process.pid)) < 2 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        "aepsl predict: interrupted; re-run the same command to resume"
    )


def test_a_wrong_size_mask_is_found_before_any_training(folder_dataset, tmp_path, capsys):
    from aepsl.io import write_index_png

    write_index_png(folder_dataset / "masks" / "img3.png", np.zeros((40, 32), np.uint8))
    out = tmp_path / "run"
    assert main(["mine", DEMO, f"data.root={folder_dataset}", *TINY, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "masks/img3.png: mask is 32x40 but its image img3.png is 32x32" in line
    assert not (out / "mine" / "step1").exists()  # nothing trained first
