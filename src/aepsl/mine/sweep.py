"""Is erasing better than lowering the threshold? Precision / recall of step-1 CAM regions over
a sweep of thresholds, from the CAMs `mine.save_cams=true` stored, beside the union's points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from aepsl.data.datasets import Dataset, load_mask
from aepsl.evaluation import region_scores
from aepsl.regions import ThresholdMode, cams_to_regions


def sweep_step_cams(
    data: Dataset,
    split: str,
    cams_dir: Path,
    thresholds: list[float],
    mode: ThresholdMode = "relative",
) -> list[dict[str, float]]:
    """Region precision and recall at each threshold, pooled over the split's pixels."""
    totals = np.zeros((len(thresholds), 3), np.int64)
    for sample in data.split(split):
        stored = np.load(cams_dir / f"{sample.id}.npz", allow_pickle=False)
        keys = stored["keys"].astype(int).tolist()
        cams = torch.from_numpy(stored["cams"].astype(np.float32))
        target = load_mask(sample, tuple(cams.shape[-2:]), data.num_classes)
        for row, threshold in enumerate(thresholds):
            labels = cams_to_regions(cams, keys, mode, threshold)
            totals[row] += region_scores(labels.numpy(), target)
    return [
        {
            "threshold": t,
            "precision": round(c / m, 4) if m else float("nan"),
            "recall": round(c / o, 4) if o else float("nan"),
        }
        for t, (c, m, o) in zip(thresholds, totals, strict=True)
    ]


def union_points(metrics_path: Path) -> list[dict[str, float]]:
    """(step, precision, recall) of the union after each step, from OUT/mine/metrics.json."""
    steps = json.loads(metrics_path.read_text())["steps"]
    return [
        {"step": s["step"], **{k: s["union_regions"][k] for k in ("precision", "recall")}}
        for s in steps
        if s.get("union_regions")
    ]
