"""Reading a run folder for the report: the metrics, loss curves, samples and picture paths the
stages left, gathered into one `RunReport`. Nothing here draws or writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aepsl.ceiling import Ceiling, read_ceiling
from aepsl.config import Config
from aepsl.data.datasets import Dataset, Sample, load_dataset
from aepsl.errors import UserError
from aepsl.layout import RunLayout


@dataclass
class RunReport:
    """What the report shows of a run, read from its folder."""

    config: Config
    run: RunLayout
    data: Dataset | None
    data_error: str | None  # why the dataset could not be read (pictures limited)
    versions: dict[str, Any]
    steps: list[int]  # erasing steps with a folder
    train: list[Sample]  # sampled training images (those drawn in mine's vis/)
    val: list[Sample]
    mine: dict[str, Any] | None  # each stage's metrics.json (None: not run)
    labels: dict[str, Any] | None
    train_metrics: dict[str, Any] | None
    # what ran: the first erasing step's and the segmentation network's train.json (epochs,
    # iterations, images), None before they trained
    mine_log: dict[str, Any] | None = None
    train_log: dict[str, Any] | None = None
    mine_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    train_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    predicted: tuple[Path | None, Path | None] = (None, None)  # report predictions, CRF
    ceiling: Ceiling | None = None  # the run trained on the masks (setting `ceiling`)
    ceiling_error: str | None = None  # why that run could not be used


def read_run(config: Config, out: Path, max_train_images: int, val_images: int) -> RunReport:
    run = RunLayout(out, config)
    data, data_error = _try_dataset(config)
    ceiling, ceiling_error = None, None
    try:
        ceiling = read_ceiling(config, out)
    except UserError as exc:
        ceiling_error = str(exc)
    mine_curves = {tag.split("/")[0]: p for tag, p in read_scalars(run.mine_tensorboard).items()}
    train_curves = {t.split("/")[-1]: p for t, p in read_scalars(run.train_tensorboard).items()}
    predicted = tuple(
        folder if (folder / "manifest.json").is_file() else None
        for folder in (run.report_predict, run.report_predict_crf)
    )
    return RunReport(
        config=config,
        run=run,
        data=data,
        data_error=data_error,
        versions=_versions(run.config_file),
        steps=run.steps_on_disk(),
        train=report_train_samples(config, run, data)[:max_train_images],
        val=_val_samples(config, run, data)[:val_images],
        mine=_read_json(run.mine_metrics),
        labels=_read_json(run.labels_metrics),
        train_metrics=_read_json(run.train_metrics),
        mine_log=_read_json(run.step(1).train_log),
        train_log=_read_json(run.train_log),
        mine_curves=mine_curves,
        train_curves=train_curves,
        predicted=predicted,
        ceiling=ceiling,
        ceiling_error=ceiling_error,
    )


def read_scalars(logdir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every scalar series of a TensorBoard log folder: tag -> sorted (step, value) pairs, the
    last value kept where a resumed run logged a step twice. A missing folder gives {}."""
    if not Path(logdir).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = {event.step: event.value for event in accumulator.Scalars(tag)}
        series[tag] = sorted((float(s), float(v)) for s, v in points.items())
    return series


def _try_dataset(config: Config) -> tuple[Dataset | None, str | None]:
    try:
        return load_dataset(config.data), None
    except UserError as exc:
        return None, str(exc)


def report_train_samples(config: Config, run: RunLayout, data: Dataset | None) -> list[Sample]:
    """Training images with a mine vis picture at some step, in split order."""
    ids = run.drawn_ids()
    if data is not None and data.has_split(config.data.train_split):
        return [s for s in data.split(config.data.train_split) if s.id in ids]
    return [Sample(i, Path(), ()) for i in sorted(ids)]  # dataset gone: run-folder panels only


def _val_samples(config: Config, run: RunLayout, data: Dataset | None) -> list[Sample]:
    if data is not None and data.has_split(config.data.val_split):
        return list(data.split(config.data.val_split))
    return [Sample(p.stem, Path(), ()) for p in sorted(run.predict.glob("*.png"))]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _versions(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        return {}
    try:
        return (yaml.safe_load(config_file.read_text()) or {}).get("versions") or {}
    except (OSError, yaml.YAMLError):
        return {}
