"""Does a trained segmentation network fit its pseudo labels, and what would PSL's prohibitive
mask teach it? A diagnostic of finished `aepsl run` folders, to compare PSL with the pseudo
labels alone (`train.psl=false`) trained on the same labels.

For each run, over its train images (the network at one scale, no flip, no ν weighting):

- nu+ / nu+ q10 / nu-: the class branch's ν on the image's classes (mean, 10th percentile) and
  on the absent ones (mean);
- f_c > f_0: of the pixels the pseudo labels give a class c, the share where the network scores
  c above background;
- S_hat = c: the share where the prohibitive mask (aepsl.psl.loss.prohibitive_mask, ν-weighted)
  picks c, i.e. what PSL's second cross-entropy teaches there;
- median ratio: the median of f_c / (f_c + f_0) on those pixels.

    python benchmarks/psl_fit.py runs/rob3/real_96px_10cls_3obj/seed0/{after,nopsl}

Run it from the folder the runs were made in: a relative data.root in a run's config.yaml is
read from there. --limit N looks at the first N train images only (for large data sets).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from aepsl.config import DataConfig
from aepsl.data.datasets import load_dataset
from aepsl.io import read_image, read_index_png
from aepsl.models.segnet import input_scale, load_segnet
from aepsl.psl.loss import prohibitive_mask


def fit(run: Path, limit: int | None = None) -> dict[str, float]:
    saved_config = yaml.safe_load((run / "config.yaml").read_text())
    saved = saved_config["data"]
    fields = ("format", "root", "empty_labels", "mask_cache")
    data = load_dataset(DataConfig(**{key: saved.get(key) for key in fields if key in saved}))
    pseudo_labels = Path(saved_config.get("labels", {}).get("dir") or run / "labels")
    model = load_segnet(run / "train" / "model.pt").eval()
    nu_present, nu_absent, ratios = [], [], []
    above = picked = labelled = 0
    for sample in data.split(saved["train_split"])[:limit]:
        image = torch.from_numpy(read_image(sample.image).copy()).permute(2, 0, 1).float() / 255
        size = tuple(image.shape[1:])
        # the image at the size the network trained at, as `aepsl predict` scales it
        factor = input_scale(*size, model.input_size, model.input_min_side)
        batch = (
            F.interpolate(image[None], scale_factor=factor, mode="bilinear")
            if factor != 1
            else image[None]
        )
        with torch.no_grad():
            scores, class_logits = model(batch)
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        probs, nu = scores.softmax(dim=1)[0], torch.sigmoid(class_logits)[0]
        present = torch.zeros(data.num_classes, dtype=torch.bool)
        present[[k - 1 for k in sample.labels]] = True
        nu_present += nu[present].tolist()
        nu_absent += nu[~present].tolist()
        mask = prohibitive_mask(scores, nu[None], present[None])[0]
        pseudo = torch.from_numpy(read_index_png(pseudo_labels / f"{sample.id}.png").astype(int))
        for k in sample.labels:
            where = pseudo == k
            if not where.any():
                continue
            f_c, f_0 = probs[k][where], probs[0][where]
            labelled += int(where.sum())
            above += int((f_c > f_0).sum())
            picked += int((mask[where] == k).sum())
            ratios.append((f_c / (f_c + f_0).clamp(min=1e-12)).numpy())
    if not nu_present:
        raise SystemExit(f"{run}: no labelled train image to look at")
    return {
        "nu+": float(np.mean(nu_present)),
        "nu+ q10": float(np.quantile(nu_present, 0.1)),
        "nu-": float(np.mean(nu_absent)),
        "f_c > f_0": above / max(labelled, 1),
        "S_hat = c": picked / max(labelled, 1),
        "median ratio": float(np.median(np.concatenate(ratios))) if ratios else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `aepsl run` folders")
    parser.add_argument("--limit", type=int, help="the first N train images only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = ("nu+", "nu+ q10", "nu-", "f_c > f_0", "S_hat = c", "median ratio")
    print(f"{'run':<60}" + "".join(f"{n:>14}" for n in names))
    for run in args.runs:
        row = fit(run, args.limit)
        print(f"{run!s:<60}" + "".join(f"{row[n]:>14.3f}" for n in names))


if __name__ == "__main__":
    main()
