"""The ceiling: a run's val mIoU as a fraction of the same network trained on the ground-truth
masks (`aepsl run CONFIG labels.dir=DATA/masks --out SUP`), named by the setting `ceiling`.

A weakly supervised score means little alone: the same network, crops and schedule trained on
the real masks say how much of the data's own ceiling the pseudo labels reach. The fraction is
read from the two runs' train/metrics.json, so it needs no network and never goes stale: the
report and `aepsl run` / `aepsl train` compute it whenever they print scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aepsl.config import Config
from aepsl.errors import UserError
from aepsl.health import ONE_CLASS
from aepsl.io import read_json

SCORES = ("without_crf", "with_crf")


@dataclass(frozen=True)
class Ceiling:
    """The ceiling run's val scores and where its labels came from."""

    run: Path
    miou: dict[str, float | None]  # without_crf / with_crf
    labels: str  # its labels.dir, or "pseudo labels" when it mined its own
    collapsed: bool  # its val predictions are one class: no ceiling to measure against


def read_ceiling(config: Config, out: Path | None = None) -> Ceiling | None:
    """The run folder named by `config.ceiling`, checked to be a finished run scored on the
    same data and val split as this one (None when the setting is not given)."""
    if not config.ceiling:
        return None
    run = Path(config.ceiling)
    where = f"ceiling: {run}"
    if out is not None and run.resolve() == Path(out).resolve():
        raise UserError(f"{where} is this run's own folder; name the run trained on the masks")
    fix = "name a run folder whose train stage finished (aepsl run CONFIG labels.dir=DATA/masks)"
    if not run.is_dir():
        raise UserError(f"{where}: no such folder; {fix}")
    manifest = read_json(run / "train" / "manifest.json", fix)
    metrics = read_json(run / "train" / "metrics.json", fix)
    if not manifest.get("complete"):
        raise UserError(f"{where}: its train stage did not finish; {fix}")
    data = (manifest.get("settings") or {}).get("data") or {}
    theirs = (data.get("root"), data.get("val_split"))
    ours = (config.data.root, config.data.val_split)
    if theirs[0] is None or Path(theirs[0]).resolve() != Path(str(ours[0])).resolve():
        raise UserError(f"{where} was trained on data {theirs[0]}, this run on {ours[0]}")
    if theirs[1] != ours[1] or metrics.get("split") != ours[1]:
        raise UserError(f"{where} was scored on split '{theirs[1]}', this run on '{ours[1]}'")
    miou = {key: (metrics.get(key) or {}).get("mIoU") for key in SCORES}
    if miou["without_crf"] is None:
        raise UserError(f"{where}: train/metrics.json holds no val mIoU; {fix}")
    collapsed = any(ONE_CLASS in w for w in metrics.get("warnings") or [])
    return Ceiling(run, miou, _labels_source(run), collapsed)


def _labels_source(run: Path) -> str:
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        return str(saved["labels"]["dir"] or "pseudo labels")
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "unknown (no readable config.yaml)"


def ceiling_fractions(metrics: dict[str, Any], ceiling: Ceiling) -> dict[str, float | None]:
    """Per score (without / with CRF), this run's val mIoU over the ceiling's (None where either
    is missing, or the ceiling collapsed)."""
    fractions: dict[str, float | None] = {}
    for key in SCORES:
        ours = (metrics.get(key) or {}).get("mIoU")
        theirs = ceiling.miou[key]
        usable = ours is not None and theirs and not ceiling.collapsed
        fractions[key] = ours / theirs if usable else None
    return fractions


def ceiling_line(metrics: dict[str, Any], ceiling: Ceiling) -> str:
    """One line for the terminal and the report: the fractions, or why there are none."""
    if ceiling.collapsed:
        return (
            f"ceiling {ceiling.run}: its network collapsed to one class (its health warnings), "
            "so no fraction of it is given"
        )
    fractions = ceiling_fractions(metrics, ceiling)
    parts = [
        f"{key.replace('_', ' ')} {fractions[key]:.2f} of {ceiling.miou[key]:.3f}"
        for key in SCORES
        if fractions[key] is not None
    ]
    if not parts:
        return f"ceiling {ceiling.run}: this run has no val mIoU to compare"
    return f"of the ceiling ({ceiling.run}, trained on {ceiling.labels}): val mIoU " + ", ".join(
        parts
    )
