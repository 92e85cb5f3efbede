"""Output that cannot be written, through the command line, and writes that survive a
power cut (fsync, rename, fsync of the folder).

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from helpers import DEMO, refuse
from helpers import TINY_MINE as TINY

from aepsl.io import write_index_png

# ------------------------------------------------------------------ output folder


@pytest.mark.parametrize("under", [False, True], ids=["out-is-a-file", "out-under-a-file"])
def test_output_folder_that_cannot_be_written(capsys, tmp_path, data, under):
    """Extends tests/test_cli.py::test_output_folder_not_writable with the full contract."""
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    out = blocker / "run" if under else blocker
    argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(out)]
    problem = "is not writable" if under else "is an existing file, not a folder"
    refuse(capsys, tmp_path, argv, f"{out}: output folder {problem}")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", ["mine", "run", "predict", "evaluate", "demo"])
def test_an_empty_out_is_refused(capsys, tmp_path, data, cwd, command):
    """--out '' would have written into the working folder."""
    argv = {
        "predict": ["predict", "--checkpoint", "model.pt", "--images", str(data / "images")],
        "evaluate": ["evaluate", str(data / "masks"), DEMO, f"data.root={data}"],
        "demo": ["demo"],
    }.get(command, [command, DEMO, f"data.root={data}", *TINY])
    refuse(capsys, tmp_path, [*argv, "--out", ""], "--out is empty: name the folder to write to")
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("kind", ["long-name", "long-path"])
def test_an_out_the_file_system_cannot_hold_is_one_line(capsys, tmp_path, data, kind):
    out = tmp_path / ("a" * 300) if kind == "long-name" else tmp_path.joinpath(*["b" * 200] * 20)
    problem = "is 300 bytes, over the 255" if kind == "long-name" else "the path is too long"
    argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(out)]
    refuse(capsys, tmp_path, argv, problem)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes through chmod 0o500; the file cases above cover the refusal",
)
def test_output_folder_without_write_permission(capsys, tmp_path, data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(locked / "run")]
        refuse(capsys, tmp_path, argv, f"{locked / 'run'}: output folder is not writable")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ issue 15: durability


@pytest.mark.parametrize("writer", ["write_json", "write_text", "write_index_png", "checkpoint"])
def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch, writer):
    """fsync(file), then rename, then fsync(folder): a power cut leaves the old file or the
    whole new one, never an empty one."""
    import aepsl.io as aepsl_io

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(aepsl_io.os, "fsync", fsync)
    monkeypatch.setattr(aepsl_io.os, "replace", replace)
    target = tmp_path / "out" / "file"
    {
        "write_json": lambda: aepsl_io.write_json(target, {"a": 1}),
        "write_text": lambda: aepsl_io.write_text(target, "text"),
        "write_index_png": lambda: write_index_png(target, np.zeros((4, 4), np.uint8)),
        "checkpoint": lambda: aepsl_io.save_checkpoint(target, {"w": torch.zeros(2)}),
    }[writer]()
    assert events == ["fsync file", "rename", "fsync folder"]
    assert target.stat().st_size > 0
    assert [p.name for p in target.parent.iterdir()] == ["file"]


def test_failed_atomic_write_is_not_synced_nor_renamed(tmp_path, monkeypatch):
    import aepsl.io as aepsl_io

    events: list[str] = []
    monkeypatch.setattr(aepsl_io.os, "fsync", lambda fd: events.append("fsync"))
    target = tmp_path / "file"
    target.write_text("old")
    with pytest.raises(RuntimeError), aepsl_io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert events == [] and target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_evaluate_never_writes_into_the_dataset(capsys, tmp_path, data):
    """Scoring the ground truth against itself wrote metrics.json and config.yaml into masks/."""
    argv = ["evaluate", str(data / "masks"), DEMO, f"data.root={data}"]
    refuse(capsys, tmp_path, argv, "--out (default: the prediction folder) is the dataset's")
    argv = ["evaluate", str(data / "masks"), DEMO, f"data.root={data}", "--out", str(data)]
    refuse(capsys, tmp_path, argv, "--out is the dataset's folder")


def test_evaluate_keeps_the_config_of_the_command_that_predicted(tmp_path, data, capsys):
    from aepsl.cli import main

    predictions = tmp_path / "other_method"
    predictions.mkdir()
    for mask in (data / "masks").glob("*.png"):
        (predictions / mask.name).write_bytes(mask.read_bytes())
    (predictions / "config.yaml").write_text("another tool's settings\n")
    assert main(["evaluate", str(predictions), DEMO, f"data.root={data}"]) == 0
    assert (predictions / "config.yaml").read_text() == "another tool's settings\n"
    assert (predictions / "evaluate_config.yaml").is_file()
    assert "mIoU" in capsys.readouterr().out


def test_demo_never_replaces_files_it_did_not_write(capsys, tmp_path, cwd):
    mine = tmp_path / "x" / "data"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    refuse(capsys, tmp_path, ["demo", "--tiny", "--out", str(tmp_path / "x")], "did not write")
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_second_process_on_the_same_run_folder_stops_and_a_dead_ones_lock_is_taken(
    capsys, tmp_path, data
):
    """Two runs into one folder deleted each other's stage folders; now the second stops in one
    line naming the first. The kernel drops the lock of a killed process."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from aepsl.layout import run_lock\n"
            "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(out)]
        line = refuse(capsys, tmp_path, argv, f"{out}: in use by another aepsl process", out=out)
        assert f"pid {holder.pid} on " in line and "wait for it to end" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    from aepsl.layout import run_lock

    with run_lock(out):  # the killed process's lock is free
        assert (out / ".aepsl.lock").is_file()
    assert not (out / ".aepsl.lock").exists()  # a finished command leaves no lock file
