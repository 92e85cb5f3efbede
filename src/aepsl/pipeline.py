"""The stages as commands run them (`aepsl labels`, `aepsl train`), and `aepsl run`: the whole
method, stage after stage, each skipped when it already finished.

Every stage records in its folder's manifest.json a hash of the settings that produced it,
the stage before it included, so a changed setting re-runs that stage and every one after it,
and an interrupted run resumes inside the stage it was in.

Under `torchrun`, mine, train and the val prediction run on every process (data parallel);
the pseudo labels and the report are written by rank 0 while the others wait.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aepsl.ceiling import Ceiling, ceiling_line, read_ceiling
from aepsl.config import Config
from aepsl.health import verdict
from aepsl.inference.predict import evaluate_trained, predict_report_images
from aepsl.labels.stage import run_labels
from aepsl.mine.stage import run_mine
from aepsl.psl.stage import run_train
from aepsl.report import write_report
from aepsl.runtime import is_main, on_main, per_rank_batch, select_device


def labels_stage(config: Config, out: Path) -> dict[str, Any]:
    """`aepsl labels`: the pseudo labels, written by rank 0 while the others wait."""
    select_device(config)  # joins the process group under torchrun
    return on_main(run_labels, config, out)


def train_stage(config: Config, out: Path) -> dict[str, Any]:
    """`aepsl train`: PSL training, then the val split predicted and scored without and with
    CRF (OUT/train/metrics.json, returned)."""
    ceiling = read_ceiling(config, out)  # a wrong folder fails before any training
    model = run_train(config, out)
    result = evaluate_trained(config, out, model, select_device(config))
    print_scores(result, ceiling)
    return result


def print_scores(result: dict[str, Any], ceiling: Ceiling | None) -> None:
    """The val scores, and with `ceiling` the fraction of it they reach."""
    for key in ("without_crf", "with_crf"):
        if result.get(key):
            print(f"val mIoU {key.replace('_', ' ')}: {result[key]['mIoU']:.3f}")
    if result.get("note"):
        print(result["note"])
    if ceiling is not None and result.get("without_crf"):
        print(ceiling_line(result, ceiling))


def run_pipeline(config: Config, out: Path) -> dict[str, Any]:
    """mine → labels → train → val prediction and scores → predictions of the report's
    training images → OUT/report.html."""
    select_device(config)  # joins the process group under torchrun
    per_rank_batch(config.mine.batch_size, "mine.batch_size")  # fail before any work
    per_rank_batch(config.train.batch_size, "train.batch_size")
    ceiling = read_ceiling(config, out)
    mine = run_mine(config, out)
    labels = on_main(run_labels, config, out)
    model = run_train(config, out)
    device = select_device(config)
    val = evaluate_trained(config, out, model, device)
    if is_main():
        print_scores(val, ceiling)
    on_main(predict_report_images, config, out, model, device)
    report = on_main(write_report, config, out)
    print(f"report: {report}")
    found = {
        stage: result.get("warnings") or []
        for stage, result in (("mine", mine), ("labels", labels), ("train", val))
    }
    print(verdict(found))
    return {"mine": mine, "labels": labels, "val": val, "report": str(report)}
