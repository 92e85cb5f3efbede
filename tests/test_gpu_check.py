"""benchmarks/gpu_check.py runs dry on the CPU (tiny sizes), so the GPU check cannot rot
between the sessions that have a GPU to run it on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_dry_and_writes_its_summary(tmp_path):
    sections = ["machine", "peak", "training", "crf", "loader", "run", "torchrun"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path), "--only", *sections],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert list(report) == sections
    assert report["training"]["segnet"]["images_per_s"] > 0
    assert report["training"]["classifier"]["fraction_of_peak"] > 0
    assert report["crf"]["labels_equal_to_cpu"] == 1.0
    assert report["run"]["exit"] == 0 and report["torchrun"]["exit"] == 0
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (dry run on the CPU)")
