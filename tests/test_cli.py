"""CLI conventions: config + overrides, one-line errors with exit 2, config.yaml with outputs."""

import json
import subprocess
import sys

import numpy as np
import yaml
from helpers import DEMO

from aepsl.cli import main
from aepsl.io import read_index_png, write_index_png


def test_data_info(folder_dataset, capsys):
    assert main(["data-info", DEMO, f"data.root={folder_dataset}", "--check"]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and "train" in out and "val" in out
    assert "all images and masks decode" in out


def test_unknown_key_exits_2_with_one_line(tmp_path, capsys):
    assert main(["data-info", DEMO, "mine.stepz=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown config key 'mine.stepz'" in err and "mine.steps" in err


def test_overrides_without_config_file(folder_dataset, capsys):
    assert main(["data-info", f"data.root={folder_dataset}"]) == 0


def test_missing_dataset_is_clear(tmp_path, capsys):
    assert main(["data-info", DEMO, f"data.root={tmp_path / 'none'}"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_output_folder_not_writable(folder_dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["mine", DEMO, f"data.root={folder_dataset}", "--out", str(blocker / "sub")])
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_evaluate_writes_metrics_and_config(folder_dataset, tmp_path, capsys):
    preds = tmp_path / "preds"
    for name in ("img4", "img5"):
        mask = read_index_png(folder_dataset / "masks" / f"{name}.png")
        write_index_png(preds / f"{name}.png", np.where(mask == 255, 0, mask))
    out = tmp_path / "eval"
    assert (
        main(["evaluate", str(preds), DEMO, f"data.root={folder_dataset}", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "protocol:" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mIoU"] == 1.0 and metrics["split"] == "val"
    assert metrics["predictions"] == str(preds)
    saved = yaml.safe_load((out / "evaluate_config.yaml").read_text())
    assert saved["data"]["root"] == str(folder_dataset) and "torch" in saved["versions"]
    # scoring again into the same folder replaces evaluate's own file
    assert (
        main(["evaluate", str(preds), DEMO, f"data.root={folder_dataset}", "--out", str(out)]) == 0
    )


def test_evaluate_keeps_a_stages_metrics(folder_dataset, tmp_path, capsys):
    """`aepsl evaluate RUN/labels` would replace the labels stage's metrics.json (its scores
    under two protocols and its health warnings): refused, the file kept, --out named."""
    stage = tmp_path / "labels"
    for name in ("img4", "img5"):
        mask = read_index_png(folder_dataset / "masks" / f"{name}.png")
        write_index_png(stage / f"{name}.png", mask)
    own = '{"mIoU": 0.5, "warnings": []}\n'
    (stage / "metrics.json").write_text(own)
    assert main(["evaluate", str(stage), DEMO, f"data.root={folder_dataset}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("the metrics of another aepsl command; give --out DIR for the scores")
    assert "\n" not in err and (stage / "metrics.json").read_text() == own
    assert not (stage / "config.yaml").exists()


def test_evaluate_missing_prediction(folder_dataset, tmp_path, capsys):
    (tmp_path / "preds").mkdir()
    assert main(["evaluate", str(tmp_path / "preds"), DEMO, f"data.root={folder_dataset}"]) == 2
    assert "img4.png: file not found" in capsys.readouterr().err


def test_console_script_entry_point(folder_dataset):
    result = subprocess.run(
        [sys.executable, "-m", "aepsl", "data-info", DEMO, "data.root=/nonexistent"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("aepsl data-info: error: /nonexistent")


def test_overrides_after_options(folder_dataset, tmp_path, capsys):
    """As users type it: `aepsl COMMAND CONFIG --option VALUE key=value`."""
    out = tmp_path / "eval"
    preds = tmp_path / "preds"
    for name in ("img4", "img5"):
        write_index_png(
            preds / f"{name}.png", read_index_png(folder_dataset / "masks" / f"{name}.png")
        )
    argv = [
        "evaluate",
        str(preds),
        DEMO,
        "--out",
        str(out),
        f"data.root={folder_dataset}",
        "seed=3",
    ]
    assert main(argv) == 0
    saved = yaml.safe_load((out / "evaluate_config.yaml").read_text())
    assert saved["seed"] == 3 and saved["data"]["root"] == str(folder_dataset)
    assert main(["data-info", "--check", f"data.root={folder_dataset}"]) == 0


def test_unknown_option_after_overrides_is_argparse_error(folder_dataset, capsys):
    try:
        main(["data-info", f"data.root={folder_dataset}", "--nope"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_closed_pipe_ends_quietly(folder_dataset):
    """`aepsl data-info ... | head -1`: no BrokenPipeError traceback."""
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    writer = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom aepsl.cli import main\n"
            "time.sleep(1)\nfor _ in range(200):\n    main(['data-info', *sys.argv[1:]])",
            DEMO,
            f"data.root={folder_dataset}",
        ],
        stdout=reader.stdin,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    reader.stdin.close()
    reader.wait()
    assert "Traceback" not in writer.stderr and "BrokenPipeError" not in writer.stderr


def test_sigterm_is_one_line_and_exit_143(folder_dataset, tmp_path):
    code = (
        "import os, signal, sys\n"
        "import aepsl.cli as cli\n"
        "def stage(args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "cli.cmd_stage = stage\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "mine",
            DEMO,
            f"data.root={folder_dataset}",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 143
    assert result.stderr.strip() == "aepsl mine: terminated; re-run the same command to resume"
