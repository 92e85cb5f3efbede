"""`aepsl mine`: K steps of adversarial erasing (docs/method.md, stage 1).

Writes OUT/mine (layout.py lists its files; each written atomically, a re-run skips finished
work): per step the classifier (train.py), its regions (extract.py) and metrics (scores.py),
then the union of the steps' regions.

Under `torchrun` every process trains the same classifier on its share of each global batch
(DDP), extracts the CAMs and regions of its share of the images, and rank 0 alone writes the
shared files (checkpoints, JSON, tensorboard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aepsl.config import Config
from aepsl.data.datasets import Sample, check_inputs, load_dataset, scored_samples
from aepsl.errors import UserError
from aepsl.health import check_folder
from aepsl.io import read_json, write_json
from aepsl.layout import RunLayout
from aepsl.mine.context import MineContext
from aepsl.mine.data import mean_pixel
from aepsl.mine.extract import external_regions, extract_regions, write_union
from aepsl.mine.scores import score_regions, seed_scores, val_map
from aepsl.mine.train import step_epochs, train_step
from aepsl.runtime import (
    barrier,
    check_precision,
    is_main,
    on_main,
    per_rank_batch,
    select_device,
)
from aepsl.training import batches_per_epoch


def run_mine(config: Config, out: Path) -> dict[str, Any]:
    """Run (or resume) all erasing steps; returns the metrics written to OUT/mine/metrics.json."""
    device = select_device(config)
    check_precision(config, device)
    per_rank_batch(config.mine.batch_size, "mine.batch_size")
    data = load_dataset(config.data)
    train = data.training_split(config.data.train_split)
    run = RunLayout(out, config)
    unused = config.labels.dir or config.labels.cams_dir
    if unused:  # pseudo labels or CAMs made elsewhere: nothing reads what mine would write
        key = "labels.dir" if config.labels.dir else "labels.cams_dir"
        note = f"{key} is set ({unused}), so the labels do not come from erasing"
        print(f"mine: skipped: {note}; unset {key} to mine")
        return {"skipped": note, "warnings": []}
    required = [run.mine_metrics, *(run.union_region(s.id) for s in train)]
    if on_main(run.finished, "mine", required):
        return read_json(run.mine_metrics, run.redo("mine"))
    check_inputs(data, config.data)  # every header and mask size, before hours of training
    fill = on_main(_mean_pixel, run, train)
    split, scored = scored_samples(data, config.data)
    ctx = MineContext(config, data, train, run, fill, device, scored, split)
    _announce_epochs(ctx)
    steps: list[dict[str, Any]] = []
    for number in range(1, config.mine.steps + 1):
        losses = [r["train_loss"] for r in steps if r["train_loss"] is not None]
        first_loss = losses[0] if losses else None  # step 1's, or 2's after mine.step1_cams
        record = _run_step(ctx, number, first_loss)
        steps.append(record)
        print(_step_line(record))
        if "stopped" in record:
            break
    return _finish(ctx, steps)


def _announce_epochs(ctx: MineContext) -> None:
    """Say so when mine.min_positives lengthens each step beyond mine.epochs."""
    cfg, train = ctx.config.mine, ctx.train
    epochs = step_epochs(cfg, train)
    trains = cfg.steps > (1 if cfg.step1_cams else 0)  # a classifier at all
    if trains and epochs > cfg.epochs:
        classes = len({label for sample in train for label in sample.labels})
        per_epoch = batches_per_epoch(len(train), cfg.batch_size)
        print(
            f"mine: {epochs} epochs ({epochs * per_epoch} iterations) per step instead of "
            f"mine.epochs={cfg.epochs}, so that the {classes} classes of the train "
            f"split are seen on average about mine.min_positives={cfg.min_positives} "
            "times each"
        )


def _run_step(ctx: MineContext, number: int, first_loss: float | None) -> dict[str, Any]:
    """Erasing step `number` (or its record, when finished): train, extract, score."""
    config, run = ctx.config, ctx.run
    step = run.step(number)
    if on_main(step.done.is_file):
        return read_json(step.done, run.redo("mine"))
    if number == 1 and config.mine.step1_cams:
        external_regions(ctx, step)
        record = {"step": 1, "train_loss": None, "cams": config.mine.step1_cams}
        record["val_mAP"] = None
        record.update(score_regions(ctx, number))
    else:
        model, loss = train_step(ctx, step)
        record = {"step": number, "train_loss": loss}
        factor = config.mine.auto_stop_factor
        if config.mine.auto_stop and first_loss is not None and loss > factor * first_loss:
            record["stopped"] = (
                f"final loss {loss:.4f} > {factor} x step 1's "
                f"{first_loss:.4f}: regions of this step are not used"
            )
        else:
            extract_regions(ctx, step, model)
            record["val_mAP"] = val_map(ctx, model)
            record.update(score_regions(ctx, number))
    on_main(write_json, step.done, record)
    return record


def _finish(ctx: MineContext, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The union of the steps used, the seed mIoU, the health check and metrics.json."""
    config, run = ctx.config, ctx.run
    used = [r["step"] for r in steps if "stopped" not in r]
    write_union(ctx, used)
    seeds = seed_scores(ctx, used)
    names = ctx.data.classes
    found = on_main(
        check_folder,
        run.union_regions,
        ctx.train,
        names,
        "mine",
        "mined regions",
        check_dominant=False,  # unmined pixels (0) cover most of any image: no collapse
    )
    metrics = {
        "steps": steps,
        "steps_used": used,
        "threshold_mode": config.mine.threshold_mode,
        "threshold": config.mine.threshold,
        "mean_pixel": ctx.fill,
        "region_metrics": "precision = correctly mined / mined pixels; recall = correctly "
        "mined / ground-truth object pixels; conflicts count as mined, never correct",
        "seed_mIoU": seeds,
        "scored": {"split": ctx.score_split, "images": len(ctx.scored)},
        "warnings": found,
    }
    if is_main():
        write_json(run.mine_metrics, metrics)
        run.mark_complete("mine")
    barrier()
    return metrics


def _mean_pixel(run: RunLayout, train: list[Sample]) -> list[float]:
    if run.mean_pixel.is_file():
        fill = read_json(run.mean_pixel, run.redo("mine")).get("mean_pixel")
        if not (isinstance(fill, list) and len(fill) == 3):
            raise UserError(f"{run.mean_pixel}: damaged (no mean_pixel); {run.redo('mine')}")
        return fill
    fill = mean_pixel(train)
    write_json(run.mean_pixel, {"mean_pixel": fill})
    return fill


def _step_line(record: dict[str, Any]) -> str:
    if record.get("train_loss") is None:  # step 1 from CAMs made elsewhere (mine.step1_cams)
        parts = [f"step {record['step']}: CAMs of {record.get('cams')}"]
    else:
        parts = [f"step {record['step']}: loss {record['train_loss']:.4f}"]
    if record.get("val_mAP") is not None:
        parts.append(f"val mAP {record['val_mAP']:.3f}")
    for key in ("step", "union"):
        scores = record.get(f"{key}_regions")
        if scores:
            # None when nothing was mined (a classifier that learnt nothing) or nothing to find
            p, r = (
                "-" if scores[k] is None else f"{scores[k]:.3f}" for k in ("precision", "recall")
            )
            parts.append(f"{key} P {p} R {r}")
    if "stopped" in record:
        parts.append(f"stopped: {record['stopped']}")
    return ", ".join(parts)
