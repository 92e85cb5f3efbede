"""How well a step mined: the classifier's val mAP, the regions' precision and recall against
the ground truth, and the CAMs' seed mIoU by the field's protocol. Each process scores its share
of the images; the counts are summed over ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from aepsl.data.datasets import load_mask
from aepsl.evaluation import (
    SEED_THRESHOLDS,
    average_precision,
    region_scores,
    seed_confusions,
    seed_miou_curve,
)
from aepsl.external import image_cams
from aepsl.io import read_index_png
from aepsl.mine.context import MineContext
from aepsl.mine.data import ErasedImages
from aepsl.mine.extract import compute_cams_of, erased_loader, same_size_batches, union_of_steps
from aepsl.mine.train import load_step_classifiers
from aepsl.models.classifier import CamClassifier
from aepsl.runtime import (
    all_gather,
    all_reduce_sum,
    autocast,
    is_main,
    rank,
    to_device,
    world_size,
)


@torch.no_grad()
def val_map(ctx: MineContext, model: CamClassifier) -> float | None:
    """Classification mAP of the step's classifier on the (unerased) val split, if labelled
    (each rank scores its share of the images; the scores are gathered before the AP)."""
    config, data = ctx.config, ctx.data
    if not data.has_split(config.data.val_split):
        return None
    samples = data.split(config.data.val_split)
    if not samples:
        return None
    model.eval()
    shard = list(range(len(samples)))[rank() :: world_size()]
    dataset = ErasedImages([samples[i] for i in shard], data.num_classes, [], [0, 0, 0])
    scores, targets, order = [], [], []
    for group in same_size_batches(erased_loader(dataset, config), config.mine.batch_size):
        images = to_device(torch.stack([item[0] for item in group]), config, ctx.device)
        with autocast(config, ctx.device):
            scores.append(model(images).float().cpu())
        targets.append(torch.stack([item[1] for item in group]))
        order += [shard[item[2]] for item in group]
    gathered = all_gather((order, scores, targets))
    if len(gathered) > 1:  # back in dataset order, whatever the number of ranks
        order = [i for part in gathered for i in part[0]]
        scores = [s for part in gathered for s in part[1]]
        targets = [t for part in gathered for t in part[2]]
    scores_t, targets_t = torch.cat(scores), torch.cat(targets)
    if len(gathered) > 1:
        position = torch.empty(len(order), dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(order))
        scores_t, targets_t = scores_t[position], targets_t[position]
    ap = average_precision(scores_t, targets_t)
    return round(float(ap[~ap.isnan()].mean()), 6) if (~ap.isnan()).any() else None


def score_regions(ctx: MineContext, step: int) -> dict[str, Any]:
    """Region precision / recall of step `step` alone and of the union of steps 1..step, on
    the scored images (data.score_split); {} when they have no masks."""
    train, run = ctx.scored, ctx.run
    if not train or any(s.mask is None for s in train):
        return {}
    totals = {"step": np.zeros(3, np.int64), "union": np.zeros(3, np.int64)}
    for sample in train[rank() :: world_size()]:
        regions = read_index_png(run.step(step).region(sample.id))
        target = load_mask(sample, regions.shape, ctx.data.num_classes)
        totals["step"] += region_scores(regions, target)
        totals["union"] += region_scores(
            union_of_steps(run, sample.id, list(range(1, step + 1))), target
        )
    for key, counts in totals.items():
        totals[key] = all_reduce_sum(torch.from_numpy(counts)).numpy()
    result = {}
    for key, (correct, mined, objects) in totals.items():
        result[f"{key}_regions"] = {
            "precision": round(correct / mined, 6) if mined else None,
            "recall": round(correct / objects, 6) if objects else None,
            "mined_fraction_of_objects": round(mined / objects, 6) if objects else None,
        }
    return result


@torch.no_grad()
def seed_scores(ctx: MineContext, steps: list[int]) -> dict[str, Any] | None:
    """Seed mIoU of each step's CAMs and of their union (the per-pixel max) by the field's
    protocol (evaluation.seed_confusions), swept over the background threshold, on the training
    images with masks. Each step's classifier sees the image as it did: earlier steps' regions
    erased. None when the scored images (data.score_split) have no masks."""
    config, data, train = ctx.config, ctx.data, ctx.scored
    if not steps or not train or any(s.mask is None for s in train):
        return None
    models = load_step_classifiers(ctx, steps)
    views = {
        number: ErasedImages(
            train, data.num_classes, ctx.erased_before(ctx.run.step(number)), ctx.fill
        )
        for number in steps
    }
    names = [*(f"step {n}" for n in steps), "union"]
    labels = data.num_classes + 1
    totals = np.zeros((len(names), len(SEED_THRESHOLDS), labels, labels), np.int64)
    mine = list(range(len(train)))[rank() :: world_size()]
    batch = config.mine.batch_size  # the CAMs of this many images per forward pass and step
    bar = tqdm(total=len(mine), desc="seed mIoU", unit="img", leave=False, disable=not is_main())
    for start in range(0, len(mine), batch):
        chunk = mine[start : start + batch]
        images = {number: [views[number][index][0] for index in chunk] for number in steps}
        cams = {
            number: compute_cams_of(models[number], images[number], config, ctx.device)
            for number in steps
            if number in models  # step 1 from mine.step1_cams has none
        }
        for row_in_chunk, index in enumerate(chunk):
            sample = train[index]
            keys = list(sample.labels)
            union = None
            for row, number in enumerate(steps):
                if number in cams:
                    own = cams[number][row_in_chunk][[k - 1 for k in keys]]
                else:
                    shape = tuple(images[number][row_in_chunk].shape[-2:])
                    external = config.mine.step1_cams
                    own = torch.from_numpy(image_cams(external, sample, data.num_classes, shape))
                union = own if union is None else torch.maximum(union, own)
                target = load_mask(sample, tuple(own.shape[-2:]), data.num_classes)
                totals[row] += seed_confusions(
                    own.numpy(), keys, target, SEED_THRESHOLDS, labels - 1
                )
            totals[-1] += seed_confusions(union.numpy(), keys, target, SEED_THRESHOLDS, labels - 1)
            bar.update()
    bar.close()
    totals = all_reduce_sum(torch.from_numpy(totals)).numpy()
    result = {name: seed_miou_curve(totals[row], SEED_THRESHOLDS) for row, name in enumerate(names)}
    print(
        f"seed mIoU on split '{ctx.score_split}' ({len(train)} images), best background "
        "threshold (an oracle, chosen on ground truth): "
        + ", ".join(
            f"{name} {r['best_mIoU']:.3f} at {r['best_threshold']:.2f}"
            for name, r in result.items()
            if r["best_mIoU"] is not None
        )
    )
    return result
