"""Segmentation metrics from a confusion matrix accumulated in torch.

Protocol (printed with every score): mIoU over background + C classes, ground-truth pixels of
255 excluded; a class absent from both ground truth and prediction is left out of the mean.
Pixels a prediction leaves at 255 (pseudo labels) are excluded under `pred_ignore="exclude"`,
or counted as background under `pred_ignore="background"`, the two policies seen in the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from aepsl.data.datasets import Sample, load_mask
from aepsl.errors import UserError
from aepsl.io import IGNORE, read_index_png
from aepsl.runtime import all_reduce_sum

PredIgnore = Literal["exclude", "background"]


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_labels: int,
    pred_ignore: PredIgnore = "exclude",
) -> torch.Tensor:
    """Counts[t, p] of pixels with ground truth t and prediction p, over `num_labels` labels."""
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    if pred_ignore == "background":
        pred = torch.where(pred == IGNORE, torch.zeros_like(pred), pred)
    keep = (target != IGNORE) & (pred != IGNORE)
    bad = keep & ((target >= num_labels) | (pred >= num_labels) | (pred < 0) | (target < 0))
    if bad.any():
        raise ValueError(f"labels outside 0..{num_labels - 1} (or 255)")
    index = target[keep] * num_labels + pred[keep]
    return torch.bincount(index, minlength=num_labels**2).reshape(num_labels, num_labels)


def all_reduce_confusion(matrix: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over the ranks of a distributed run (no-op otherwise); a
    collective: every rank must call it."""
    return all_reduce_sum(matrix)


def metrics_from_confusion(matrix: torch.Tensor, names: list[str]) -> dict:
    """Per-class IoU / precision / recall and their means, as plain JSON-ready numbers."""
    m = matrix.double()
    tp = m.diag()
    gt = m.sum(1)
    pr = m.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    precision = torch.where(pr > 0, tp / pr.clamp(min=1), torch.nan)
    recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
    total = m.sum()

    def clean(x: torch.Tensor) -> float | None:
        return None if torch.isnan(x) else round(float(x), 6)

    return {
        "mIoU": clean(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": clean(tp.sum() / total) if total > 0 else None,
        "pixels": int(total),
        "per_class": {
            name: {
                "IoU": clean(iou[k]),
                "precision": clean(precision[k]),
                "recall": clean(recall[k]),
                "gt_pixels": int(gt[k]),
                "pred_pixels": int(pr[k]),
            }
            for k, name in enumerate(names)
        },
    }


def evaluate_folder(
    pred_dir: Path,
    samples: Iterable[Sample],
    classes: list[str],
    pred_ignore: PredIgnore = "exclude",
    sharded: bool = False,
) -> dict:
    """Score `pred_dir/<id>.png` against each sample's ground-truth mask.

    sharded=True: in a distributed run, every rank calls this with its own share of the
    samples and the counts are summed over the ranks (every rank gets the whole result);
    otherwise no collective is involved, so one rank may score everything alone.
    """
    num_labels = len(classes) + 1
    matrix = torch.zeros(num_labels, num_labels, dtype=torch.long)
    labelled = total = count = 0
    for sample in samples:
        if sample.mask is None:
            raise UserError(f"{sample.image}: no ground-truth mask to evaluate against")
        path = pred_dir / f"{sample.id}.png"
        pred = read_index_png(path)
        target = load_mask(sample, pred.shape, len(classes))
        bad = (pred > len(classes)) & (pred != IGNORE)
        if bad.any():
            raise UserError(f"{path}: label {int(pred[bad].max())} is out of range")
        matrix += confusion_matrix(
            torch.from_numpy(pred), torch.from_numpy(target), num_labels, pred_ignore
        )
        labelled += int((pred != IGNORE).sum())
        total += pred.size
        count += 1
    if sharded:
        matrix = all_reduce_confusion(matrix)
        sums = all_reduce_sum(torch.tensor([labelled, total, count], dtype=torch.long))
        labelled, total, count = (int(v) for v in sums)
    result = metrics_from_confusion(matrix, ["background", *classes])
    result["images"] = count
    result["labelled_fraction"] = round(labelled / total, 6) if total else None
    result["protocol"] = protocol(pred_ignore)
    return result


def protocol(pred_ignore: PredIgnore) -> str:
    predicted = "excluded" if pred_ignore == "exclude" else "counted as background"
    return (
        "mIoU over background + classes; ground-truth 255 excluded; classes absent from both "
        f"excluded from the mean; predicted 255 {predicted}"
    )


def format_table(result: dict) -> str:
    """A fixed-width table of per-class IoU, precision and recall, then the means."""
    lines = [f"{'class':<16}{'IoU':>8}{'prec':>8}{'recall':>8}"]

    def pct(x: float | None) -> str:
        return "   -" if x is None else f"{100 * x:.1f}"

    for name, row in result["per_class"].items():
        lines.append(
            f"{name:<16}{pct(row['IoU']):>8}{pct(row['precision']):>8}{pct(row['recall']):>8}"
        )
    lines.append(f"{'mIoU':<16}{pct(result['mIoU']):>8}")
    if result.get("labelled_fraction") is not None:
        lines.append(f"{'labelled':<16}{pct(result['labelled_fraction']):>8}")
    lines.append(f"protocol: {result['protocol']}")
    return "\n".join(lines)


def region_scores(regions: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(correctly mined, mined, ground-truth object) pixel counts for a region map.

    `regions` holds k where class k was mined, 0 where nothing was, 255 for conflicts (which
    count as mined and never correct); `target` is the ground-truth mask.
    """
    valid = target != IGNORE
    mined = (regions != 0) & valid
    correct = mined & (regions == target)
    objects = (target != 0) & valid
    return int(correct.sum()), int(mined.sum()), int(objects.sum())


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision of (N, C) scores against (N, C) 0/1 targets (NaN where a
    class has no positive). Ties are broken by order, as in scikit-learn's non-interpolated AP."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()
    true_pos = hits.cumsum(0)
    precision = true_pos / torch.arange(1, len(hits) + 1, dtype=torch.double).unsqueeze(1)
    positives = hits.sum(0)
    ap = (precision * hits).sum(0) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.nan)
