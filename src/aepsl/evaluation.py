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

from aepsl.config import Config
from aepsl.data.datasets import Sample, load_dataset, load_mask
from aepsl.errors import UserError
from aepsl.io import read_index_png, read_json, write_json
from aepsl.labelmap import IGNORE
from aepsl.layout import check_out, writable_out
from aepsl.record import save_config
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


# ------------------------------------------------ stage metrics: CAM seeds and pseudo labels

SEED_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))  # .05-.95

SEED_PROTOCOL = (
    "seed mIoU: CAMs of the image's classes normalised to [0, 1], a constant background score t "
    "stacked in front, argmax over background and the image's classes (a tie goes to the "
    "background, then to the class listed first); mIoU over background + classes, ground-truth "
    "255 excluded, classes absent from both excluded from the mean; t swept against ground "
    "truth, so the best t is an oracle"
)


def seed_confusions(
    cams: np.ndarray,
    present_classes: Iterable[int],
    target: np.ndarray,
    thresholds: Iterable[float],
    num_classes: int,
) -> np.ndarray:
    """Confusion matrices of one image's CAM seeds, one per background threshold.

    The standard seed protocol of the field (IRN's eval_cam.py): `cams` (K, H, W) holds the
    normalised CAMs in [0, 1] of the image's K present classes `present_classes` (values in
    1..num_classes, in the order of `cams`); a constant background score t is stacked in front
    and the argmax over background and those classes is the seed label map. A pixel therefore
    takes its highest-scoring class c when cam_c > t, and background when every cam <= t (as
    np.argmax picks the first of equal values). K = 0 gives background everywhere.

    Returns int64 counts[i, g, p] of pixels with ground truth g (`target`, (H, W), 255 excluded)
    and seed label p at `thresholds[i]` (strictly increasing), shape (T, C+1, C+1). Sum these
    over images and pass the sum to `seed_miou_curve`; only the (T, C+1, C+1) sum need be kept.
    Costs one pass over the pixels whatever T is.
    """
    cams = np.asarray(cams)
    target = np.asarray(target)
    classes = np.asarray(list(present_classes), dtype=np.int64)
    ts = np.asarray(list(thresholds), dtype=np.float64)
    labels = num_classes + 1
    if ts.ndim != 1 or ts.size == 0 or (ts.size > 1 and not (np.diff(ts) > 0).all()):
        raise ValueError("thresholds must be a non-empty, strictly increasing sequence")
    if target.ndim != 2:
        raise ValueError(f"target must be (H, W), got shape {target.shape}")
    if cams.ndim != 3 or cams.shape[0] != classes.size or cams.shape[1:] != target.shape:
        raise ValueError(
            f"cams must be ({classes.size}, {target.shape[0]}, {target.shape[1]}) for "
            f"{classes.size} present classes and target {target.shape}, got {cams.shape}"
        )
    if ((classes < 1) | (classes > num_classes)).any():
        raise ValueError(f"present classes must lie in 1..{num_classes}, got {classes.tolist()}")
    if not np.isfinite(cams).all():
        raise ValueError("cams hold NaN or infinite values")
    valid = (target != IGNORE).reshape(-1)
    gt = target.reshape(-1)[valid].astype(np.int64)
    if (gt > num_classes).any():
        raise ValueError(f"target labels outside 0..{num_classes} (or 255)")
    if classes.size:
        flat = cams.reshape(classes.size, -1)[:, valid]
        top = flat.argmax(0)
        score = flat[top, np.arange(flat.shape[1])].astype(np.float64)
        label = classes[top]
    else:
        score = np.full(gt.size, -np.inf)
        label = np.zeros(gt.size, np.int64)
    # below[n] = how many thresholds lie strictly below pixel n's score: the pixel keeps its
    # class at thresholds 0..below-1 and is background from threshold `below` on.
    below = np.searchsorted(ts, score, side="left")
    t_count = ts.size
    hist = np.bincount(
        (below * labels + gt) * labels + label, minlength=(t_count + 1) * labels * labels
    ).reshape(t_count + 1, labels, labels)
    settled = hist.cumsum(0)[:t_count]  # [i]: pixels that are background at threshold i
    out = hist.sum(0)[None] - settled  # the others keep their class
    out[:, :, 0] += settled.sum(2)
    return out


def seed_miou_curve(confusions: np.ndarray, thresholds: Iterable[float]) -> dict:
    """mIoU at each background threshold from `seed_confusions` summed over images.

    Returns {"curve": [[t, mIoU], ...], "best_threshold": t, "best_mIoU": m, "protocol": ...}
    (mIoU None where nothing was scored; the first t wins a tie). The best threshold is chosen
    against ground truth: an oracle, to be reported as such. For per-class IoU, precision and
    recall at one threshold, pass `torch.from_numpy(confusions[i])` to metrics_from_confusion.
    """
    ts = [float(t) for t in thresholds]
    m = np.asarray(confusions, dtype=np.float64)
    if m.ndim != 3 or m.shape[0] != len(ts) or m.shape[1] != m.shape[2]:
        raise ValueError(f"confusions must be ({len(ts)}, L, L), got shape {m.shape}")
    tp = np.diagonal(m, axis1=1, axis2=2)
    union = m.sum(2) + m.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    counted = present.sum(1)
    mious = [
        round(float(iou[i].sum() / counted[i]), 6) if counted[i] else None for i in range(len(ts))
    ]
    scored = [i for i, v in enumerate(mious) if v is not None]
    best = max(scored, key=lambda i: (mious[i], -i)) if scored else None
    return {
        "curve": [[t, v] for t, v in zip(ts, mious, strict=True)],
        "best_threshold": None if best is None else ts[best],
        "best_mIoU": None if best is None else mious[best],
        "protocol": SEED_PROTOCOL,
    }


def pseudo_label_confusions(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_labels: int
) -> torch.Tensor:
    """Both field policies at once for one pseudo label: (2, L, L) counts, [0] with its 255
    (unlabelled) pixels excluded, [1] with them counted as background. Sum over images and pass
    to `pseudo_label_metrics`. (`evaluate_folder` with pred_ignore "exclude" / "background"
    gives the same two numbers from a folder of PNGs, one policy per call.)"""
    pred = torch.as_tensor(np.asarray(pred))
    target = torch.as_tensor(np.asarray(target))
    return torch.stack(
        [
            confusion_matrix(pred, target, num_labels, "exclude"),
            confusion_matrix(pred, target, num_labels, "background"),
        ]
    )


def pseudo_label_metrics(confusions: torch.Tensor, names: list[str]) -> dict:
    """Pseudo-label scores side by side from summed `pseudo_label_confusions`.

    "exclude": over labelled pixels only (how precise the labels the loss sees are);
    "background": unlabelled pixels counted as background (the number most papers print).
    Each is a metrics_from_confusion dict with its "protocol"; "labelled_fraction_of_scored" is
    the share of scored pixels (ground truth not 255) that the pseudo labels label.
    """
    excluded, background = confusions[0], confusions[1]
    policies: tuple[PredIgnore, PredIgnore] = ("exclude", "background")
    result: dict = {}
    for policy, matrix in zip(policies, (excluded, background), strict=True):
        result[policy] = metrics_from_confusion(matrix, names)
        result[policy]["protocol"] = protocol(policy)
    scored = int(background.sum())
    result["labelled_fraction_of_scored"] = (
        round(int(excluded.sum()) / scored, 6) if scored else None
    )
    return result


EVALUATE_CONFIG = "evaluate_config.yaml"


def run_evaluate(
    config: Config,
    pred_dir: Path,
    out: Path | None = None,
    split: str | None = None,
    pred_ignore: PredIgnore = "exclude",
) -> dict:
    """Score a folder of <id>.png index predictions against the ground truth of `split`
    (default data.val_split); writes OUT/metrics.json (default OUT: the prediction folder),
    never replacing another aepsl command's metrics."""
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder not found")
    check_out(out or pred_dir, config, "--out" if out else "--out (default: the prediction folder)")
    folder = writable_out(out or pred_dir)
    target = folder / "metrics.json"
    # a stage's own metrics (e.g. RUN/labels/metrics.json, with its warnings) are not replaced
    give_out = "give --out DIR for the scores"
    if target.is_file() and "predictions" not in read_json(target, give_out):
        raise UserError(f"{target}: the metrics of another aepsl command; {give_out}")
    data = load_dataset(config.data)
    split = split or config.data.val_split
    result = evaluate_folder(pred_dir, data.split(split), data.classes, pred_ignore)
    result["split"] = split
    result["predictions"] = str(pred_dir)  # what was scored; marks the file as evaluate's
    print(format_table(result))
    write_json(target, result)
    # beside the scores, never over a config.yaml of the command that made the predictions
    save_config(config, folder, EVALUATE_CONFIG)
    print(f"wrote {target}")
    return result
