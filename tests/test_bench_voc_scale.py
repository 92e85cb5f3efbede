"""benchmarks/bench_voc_scale.py runs on a few images, so the VOC-scale table of docs/voc.md
can be measured again on any machine (the timings themselves are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_voc_scale.py"


def test_the_voc_scale_benchmark_prints_a_row_per_stage():
    stages = ["labels (dir)", "seed sweep", "CAM post", "psl loader"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--n", "1", "--cores", "2,16", "--only", ",".join(stages)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[1].split() == [
        "stage",
        "s/image",
        "4n/n",
        "times",
        "1",
        "core",
        "2",
        "cores",
        "16",
        "cores",
    ]
    rows = {line[:18].strip(): line[18:].split() for line in lines[2 : 2 + len(stages)]}
    assert set(rows) == set(stages)
    assert rows["labels (dir)"][2] == "10,582" and rows["seed sweep"][2] == "1,464"
    assert all(float(row[0]) > 0 for row in rows.values())  # seconds per image
