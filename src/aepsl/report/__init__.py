"""OUT/report.html: one self-contained page summarising a run, to look at instead of the logs.

read.py reads what the stages left in the run folder; render.py draws it. Nothing here runs a
network: the predictions of the sampled training images are made by the pipeline
(`inference.predict.predict_report_images`) before the report is written.
"""

from __future__ import annotations

from pathlib import Path

from aepsl.config import Config
from aepsl.io import write_text
from aepsl.report.read import read_run, read_scalars
from aepsl.report.render import render, svg_chart

__all__ = ["read_scalars", "svg_chart", "write_report"]


def write_report(
    config: Config, out: Path, *, max_train_images: int = 8, val_images: int = 4
) -> Path:
    """Write OUT/report.html from whatever the stages left in run folder `out`; returns its path.
    At most `max_train_images` training and `val_images` val images are shown."""
    report = read_run(config, Path(out), max_train_images, val_images)
    write_text(report.run.report, render(report))
    return report.run.report
