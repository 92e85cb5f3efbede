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
from aepsl.layout import differences, training_settings

SCORES = ("without_crf", "with_crf")


@dataclass(frozen=True)
class Ceiling:
    """The ceiling run's val scores and where its labels came from."""

    run: Path
    scores: dict[str, dict[str, Any] | None]  # without_crf / with_crf: mIoU, images, pixels
    labels: str  # its labels.dir, or "pseudo labels" when it mined its own
    collapsed: bool  # its val predictions are one class: no ceiling to measure against

    def miou(self, key: str) -> float | None:
        return (self.scores[key] or {}).get("mIoU")


def read_ceiling(config: Config, out: Path | None = None) -> Ceiling | None:
    """The run folder named by `config.ceiling`, checked to be a finished run with this run's
    data settings (its root apart: paths are written many ways) and networks (None when the
    setting is not given). Whether it scored the same val images is checked with the scores."""
    if not config.ceiling:
        return None
    run = Path(config.ceiling)
    where = f"ceiling: {run}"
    if out is not None and run.resolve() == Path(out).resolve():
        raise UserError(
            f"{where} is this run's own folder; name the run trained on the masks, or give "
            "ceiling=null when training that run"
        )
    fix = "name a run folder whose train stage finished (aepsl run CONFIG labels.dir=DATA/masks)"
    if not run.is_dir():
        raise UserError(f"{where}: no such folder; {fix}")
    manifest = read_json(run / "train" / "manifest.json", fix)
    metrics = read_json(run / "train" / "metrics.json", fix)
    if not manifest.get("complete"):
        raise UserError(f"{where}: its train stage did not finish; {fix}")
    settings = manifest.get("settings")
    if not isinstance(settings, dict):
        raise UserError(f"{where}: its train manifest records no settings (an older aepsl); {fix}")
    ours = training_settings(config, "train")
    compared = ("data", "model")
    changed = differences(
        {s: _without_root(settings.get(s) or {}) for s in compared},
        {s: _without_root(ours[s]) for s in compared},
    )
    if changed:
        raise UserError(f"{where} differs from this run in {changed}")
    scores = {
        key: metrics.get(key) if isinstance(metrics.get(key), dict) else None for key in SCORES
    }
    for key, score in scores.items():
        miou = (score or {}).get("mIoU")
        if miou is not None and (isinstance(miou, bool) or not isinstance(miou, int | float)):
            raise UserError(f"{where}: train/metrics.json: {key} mIoU is not a number; {fix}")
    if (scores["without_crf"] or {}).get("mIoU") is None:
        raise UserError(f"{where}: train/metrics.json holds no val mIoU; {fix}")
    warnings = metrics.get("warnings")
    collapsed = isinstance(warnings, list) and any(
        isinstance(w, str) and ONE_CLASS in w for w in warnings
    )
    return Ceiling(run, scores, _labels_source(run), collapsed)


def _without_root(section: dict[str, Any]) -> dict[str, Any]:
    """A settings section less the data root: a path is written many ways."""
    return {key: value for key, value in section.items() if key != "root"}


def _labels_source(run: Path) -> str:
    """The ceiling's labels.dir, from the config its train stage saved (RUN/config.yaml is
    rewritten by every command run in the folder)."""
    saved_file = run / "train" / "config.yaml"
    if not saved_file.is_file():
        saved_file = run / "config.yaml"
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        return str(saved["labels"]["dir"] or "pseudo labels")
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "unknown (no readable config.yaml)"


def ceiling_fractions(metrics: dict[str, Any], ceiling: Ceiling) -> dict[str, float | None]:
    """Per score (without / with CRF), this run's val mIoU over the ceiling's: None where either
    is missing, the ceiling's is 0 or it collapsed, or the two scored other val pixels."""
    fractions: dict[str, float | None] = {}
    for key in SCORES:
        ours, theirs = metrics.get(key) or {}, ceiling.scores[key] or {}
        usable = (
            ours.get("mIoU") is not None
            and theirs.get("mIoU")
            and not ceiling.collapsed
            and _same_pixels(ours, theirs)
        )
        fractions[key] = ours["mIoU"] / theirs["mIoU"] if usable else None
    return fractions


def _same_pixels(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Both scored the same number of val images and labelled pixels (when both say)."""
    return all(
        ours.get(k) is None or theirs.get(k) is None or ours[k] == theirs[k]
        for k in ("images", "pixels")
    )


def ceiling_line(metrics: dict[str, Any], ceiling: Ceiling) -> str:
    """One line for the terminal and the report: the fractions, or why there are none."""
    head = f"val mIoU as a fraction of the ceiling ({ceiling.run}, trained on {ceiling.labels})"
    if ceiling.collapsed:
        return f"{head}: none; its network collapsed to one class (its health warnings)"
    ours = metrics.get("without_crf") or {}
    theirs = ceiling.scores["without_crf"] or {}
    if ours and not _same_pixels(ours, theirs):
        return (
            f"{head}: none; it scored other val images ({theirs.get('images')} images, "
            f"{theirs.get('pixels')} pixels; this run {ours.get('images')}, {ours.get('pixels')})"
        )
    if not ceiling.miou("without_crf"):
        return f"{head}: none; its val mIoU is 0"
    fractions = ceiling_fractions(metrics, ceiling)
    parts = [
        f"{key.replace('_crf', ' CRF').replace('_', ' ')} {fractions[key]:.2f} "
        f"(ceiling {ceiling.miou(key):.3f})"
        for key in SCORES
        if fractions[key] is not None
    ]
    if not parts:
        return f"{head}: none; this run has no val mIoU"
    above = [f for f in fractions.values() if f is not None and f > 1]
    # seen with 180 training images: the masks' network, as long, scored below the pseudo labels'
    warning = (
        "; above 1: the network trained on the masks is no ceiling at this length (train it "
        "longer, or on more images)"
        if above
        else ""
    )
    return f"{head}: " + ", ".join(parts) + warning
