"""`aepsl mine`: K steps of adversarial erasing (ALGORITHM.md, stage 1).

Writes OUT/mine (layout.py lists its files; each written atomically, a re-run skips finished
work): per step the classifier, its regions and metrics, then the union of the steps' regions.

Under `torchrun` every process trains the same classifier on its share of each global batch
(DDP), extracts the CAMs and regions of its share of the images, and rank 0 alone writes the
shared files (checkpoints, JSON, tensorboard).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from aepsl.config import Config, MineConfig
from aepsl.data.datasets import Dataset, Sample, check_inputs, load_dataset, load_image, load_mask
from aepsl.errors import UserError
from aepsl.evaluation import (
    SEED_THRESHOLDS,
    average_precision,
    region_scores,
    seed_confusions,
    seed_miou_curve,
)
from aepsl.external import image_cams, write_irn_cam
from aepsl.health import check_folder
from aepsl.io import (
    atomic_path,
    read_index_png,
    read_json,
    write_index_png,
    write_json,
    write_png,
)
from aepsl.labelmap import colourise
from aepsl.layout import MineStep, RunLayout
from aepsl.mine.cam import (
    max_normalise,
    regions_to_label_map,
    threshold_regions,
    union_label_maps,
    upsample_relu,
)
from aepsl.mine.data import ErasedImages, collate_list, mean_pixel
from aepsl.models.classifier import CamClassifier, build_classifier
from aepsl.models.saved import model_record, read_model_file
from aepsl.runtime import (
    all_gather,
    all_reduce_sum,
    autocast,
    barrier,
    check_precision,
    is_main,
    on_main,
    per_rank_batch,
    prepare_model,
    rank,
    seed_everything,
    select_device,
    to_device,
    world_size,
)
from aepsl.training import Plan, Trainer, batches_per_epoch, finish, fit, poly, sgd


def run_mine(config: Config, out: Path) -> dict[str, Any]:
    """Run (or resume) all erasing steps; returns the metrics written to OUT/mine/metrics.json."""
    device = select_device(config)
    check_precision(config, device)
    per_rank_batch(config.mine.batch_size, "mine.batch_size")
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    train = data.split(config.data.train_split)
    run = RunLayout(out, config)
    unused = config.labels.dir or config.labels.cams_dir
    if unused:  # pseudo labels or CAMs made elsewhere: nothing reads what mine would write
        key = "labels.dir" if config.labels.dir else "labels.cams_dir"
        note = f"{key} is set ({unused}), so the labels do not come from erasing"
        print(f"mine: skipped: {note}; unset {key} to mine")
        return {"skipped": note, "warnings": []}
    required = [run.mine_metrics, *(run.union_region(s.id) for s in train)]
    if on_main(run.claim, "mine", required):
        print(f"mine: finished for these settings in {run.mine}; skipped")
        return read_json(run.mine_metrics, run.redo("mine"))
    check_inputs(data, config)  # every header and mask size, before hours of training
    epochs = step_epochs(config.mine, train)
    trains = config.mine.steps > (1 if config.mine.step1_cams else 0)  # a classifier at all
    if trains and epochs > config.mine.epochs:
        classes = len({label for sample in train for label in sample.labels})
        per_epoch = batches_per_epoch(len(train), config.mine.batch_size)
        print(
            f"mine: {epochs} epochs ({epochs * per_epoch} iterations) per step instead of "
            f"mine.epochs={config.mine.epochs}, so that the {classes} classes of the train "
            f"split are seen on average about mine.min_positives={config.mine.min_positives} "
            "times each"
        )
    fill = on_main(_mean_pixel, run, train)
    steps: list[dict[str, Any]] = []
    first_loss = None
    for number in range(1, config.mine.steps + 1):
        step = run.step(number)
        if on_main(step.done.is_file):
            record = read_json(step.done, run.redo("mine"))
        elif number == 1 and config.mine.step1_cams:
            _external_regions(config, data, train, step)
            record = {"step": 1, "train_loss": None, "cams": config.mine.step1_cams}
            record["val_mAP"] = None
            record.update(_score_regions(data, train, run, number))
            on_main(write_json, step.done, record)
        else:
            previous = [run.step(s).regions for s in range(1, number)]
            model, loss = _train_step(config, data, train, previous, fill, step, device, run)
            record = {"step": number, "train_loss": loss}
            stop = (
                config.mine.auto_stop
                and first_loss is not None
                and loss > config.mine.auto_stop_factor * first_loss
            )
            if stop:
                record["stopped"] = (
                    f"final loss {loss:.4f} > {config.mine.auto_stop_factor} x step 1's "
                    f"{first_loss:.4f}: regions of this step are not used"
                )
            else:
                _extract_regions(config, data, train, previous, fill, step, model, device)
                record["val_mAP"] = _val_map(config, data, model, device)
                record.update(_score_regions(data, train, run, number))
            on_main(write_json, step.done, record)
        first_loss = record["train_loss"] if first_loss is None else first_loss
        steps.append(record)
        print(_step_line(record))
        if "stopped" in record:
            break
    used = [r["step"] for r in steps if "stopped" not in r]
    _write_union(run, train, used)
    barrier()  # every rank's union maps written
    seeds = _seed_scores(config, data, train, run, used, fill, device)
    names = data.classes
    found = on_main(check_folder, run.union_regions, train, names, "mine", "mined regions", False)
    metrics = {
        "steps": steps,
        "steps_used": used,
        "threshold_mode": config.mine.threshold_mode,
        "threshold": config.mine.threshold,
        "mean_pixel": fill,
        "region_metrics": "precision = correctly mined / mined pixels; recall = correctly "
        "mined / ground-truth object pixels; conflicts count as mined, never correct",
        "seed_mIoU": seeds,
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


# ------------------------------------------------------------------ training


def classifier_loss(
    logits: torch.Tensor, rest: list[torch.Tensor], iteration: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-label BCE of a batch of (images, targets, indices); logged: the global batch's."""
    del iteration
    loss = F.binary_cross_entropy_with_logits(logits.float(), rest[0])
    return loss, {"total": all_reduce_sum(loss.detach()).item() / world_size()}


def new_classifier(config: Config, num_classes: int, weights: str | None = None) -> CamClassifier:
    """The CAM classifier `config.model` describes, initialised from `weights` (default
    model.weights)."""
    model = config.model
    return build_classifier(
        model.backbone,
        model.weights if weights is None else weights,
        num_classes,
        model.cam_output_stride,
        cam_head=model.cam_head,
    )


def classifier_trainer(
    model: CamClassifier, config: Config, device: torch.device, steps: int
) -> Trainer:
    """The SGD step of a classifier: new layers at mine.lr, a pretrained backbone at
    mine.backbone_lr_mult x it, poly decay over `steps` iterations."""
    cfg = config.mine
    pretrained = config.model.weights != "none"
    backbone_lr = cfg.lr * (cfg.backbone_lr_mult if pretrained else 1.0)
    optimizer = sgd(model, backbone_lr, cfg.lr, cfg.momentum, cfg.weight_decay)
    return Trainer(model, optimizer, lambda it: poly(it, steps), classifier_loss, config, device)


def _base_seed(config: Config, step: MineStep) -> int:
    """Step t's seed; epoch e of it draws from seed + e (permutation, crops, dropout)."""
    return config.seed * 1_000_003 + step.number * 1009


def step_epochs(cfg: MineConfig, train: list[Sample]) -> int:
    """mine.epochs, raised when needed so that each step shows the classes of the train split,
    on average, at least mine.min_positives times as positives."""
    labels = sum(len(sample.labels) for sample in train)
    classes = len({label for sample in train for label in sample.labels})
    if not labels:
        return cfg.epochs
    # an epoch shows whole batches only, so about labels x shown / images labels an epoch; in
    # integers, so a whole quotient stays whole
    images = len(train)
    shown = min(images, batches_per_epoch(images, cfg.batch_size) * cfg.batch_size)
    needed = -(-cfg.min_positives * classes * images // (labels * shown))  # ceil
    return max(cfg.epochs, needed)


def classifier_plan(
    config: Config, step: MineStep, run: RunLayout, images: int, epochs: int
) -> Plan:
    """`epochs` epochs over `images` training images, checkpointed every
    mine.checkpoint_every epochs."""
    cfg = config.mine
    per_epoch = batches_per_epoch(images, cfg.batch_size)
    return Plan(
        name=f"step {step.number}",
        iterations=per_epoch * epochs,
        batch_size=cfg.batch_size,
        epoch_seed=lambda epoch: _base_seed(config, step) + epoch,
        checkpoint=step.checkpoint,
        checkpoint_every=cfg.checkpoint_every * per_epoch,
        tensorboard=run.mine_tensorboard,
    )


def _train_step(
    config: Config,
    data: Dataset,
    train: list[Sample],
    previous: list[Path],
    fill: list[float],
    step: MineStep,
    device: torch.device,
    run: RunLayout,
) -> tuple[CamClassifier, float]:
    """Train a fresh classifier (same initialisation every step) on the erased images.

    With N processes (DDP) each trains on batch_size / N items of every global batch of the
    same seeded permutation; per-rank mean losses, averaged over ranks by DDP, equal the mean
    over the global batch, so N processes follow the one-process run (batch norms synced)."""
    cfg = config.mine
    seed_everything(config.seed)  # the same initial weights at every step, as the paper says
    model = prepare_model(new_classifier(config, data.num_classes), config, device)
    if on_main(step.classifier.is_file):
        model.load_state_dict(read_model_file(step.classifier)[1])
        return model, read_json(step.train_log, run.redo("mine"))["train_loss"]

    dataset = ErasedImages(
        train,
        data.num_classes,
        previous,
        fill,
        crop=config.data.image_size,
        seed=_base_seed(config, step),
    )
    if world_size() > 1 and len(dataset) < cfg.batch_size:
        raise UserError(
            f"mine.batch_size={cfg.batch_size} is more than the {len(dataset)} training images; "
            "with several processes every global batch must be complete"
        )
    # The decay spans ceil(n / batch) steps an epoch, as the loop of earlier versions counted.
    epochs = step_epochs(cfg, train)
    schedule = -(-len(dataset) // cfg.batch_size) * epochs
    trainer = classifier_trainer(model, config, device, schedule)
    plan = classifier_plan(config, step, run, len(dataset), epochs)
    result = fit(trainer, dataset, plan)
    loss = round(result.epoch_mean, 6)
    on_main(
        finish,
        step.checkpoint,
        step.classifier,
        model_record(
            model,
            "cam_classifier",
            config.model.backbone,
            data.num_classes,
            cam_head=config.model.cam_head,
        ),
        step.train_log,
        {"train_loss": loss, "epochs": epochs, "iterations": plan.iterations},
    )
    return model, loss


# ------------------------------------------------------------------ CAMs and regions


def _batches(loader: DataLoader, limit: int) -> Any:
    """Group a list-collated loader's items into stacks of equal image size."""
    pending: dict[tuple[int, ...], list] = defaultdict(list)
    for items in loader:
        for item in items:
            shape = tuple(item[0].shape)
            pending[shape].append(item)
            if len(pending[shape]) == limit:
                yield pending.pop(shape)
    yield from pending.values()


@torch.no_grad()
def compute_cams(
    model: CamClassifier,
    images: torch.Tensor,
    config: Config,
    device: torch.device,
    strided: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Max-normalised CAMs (N, C, H, W) of all classes from one pass per scale (and flip).

    `strided`: also return them at the network's output stride s, (N, C, ceil(H / s),
    ceil(W / s)): each pass's ReLU'd maps resized to that size, summed, max-normalised (IRN's
    `cam`, there at stride 4)."""
    size = images.shape[-2:]
    images = to_device(images, config, device)
    stride = getattr(getattr(model, "module", model), "output_stride", 8)
    small = (-(-size[0] // stride), -(-size[1] // stride))
    # At the scale the classifier learnt objects at (mine.cam_size=train): sqrt(h x w) equal
    # to the training crop's side, then each of mine.cam_scales.
    base = 1.0
    if config.mine.cam_size == "train":
        base = config.data.image_size / math.sqrt(size[0] * size[1])
    total = low = None
    for scale in config.mine.cam_scales:
        factor = base * scale
        scaled = (
            images
            if factor == 1
            else F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)
        )
        variants = [scaled, scaled.flip(-1)] if config.mine.cam_flip else [scaled]
        for k, variant in enumerate(variants):
            with autocast(config, device):
                maps = model.class_maps(variant)
            if strided:
                coarse = upsample_relu(maps, small)
                coarse = coarse.flip(-1) if k == 1 else coarse
                low = coarse if low is None else low + coarse
            maps = upsample_relu(maps, size)
            maps = maps.flip(-1) if k == 1 else maps
            total = maps if total is None else total + maps
    if strided:
        return max_normalise(total).cpu(), max_normalise(low).cpu()
    return max_normalise(total).cpu()


def _extract_regions(
    config: Config,
    data: Dataset,
    train: list[Sample],
    previous: list[Path],
    fill: list[float],
    step: MineStep,
    model: CamClassifier,
    device: torch.device,
) -> None:
    """Write the step's regions of this rank's share of the images (every rank's, after the
    closing barrier)."""
    mine = train[rank() :: world_size()]  # disjoint files per rank
    todo = [s for s in mine if not step.region(s.id).is_file()]
    if todo:
        _extract_todo(config, data, train, todo, previous, fill, step, model, device)
    barrier()


def _extract_todo(
    config: Config,
    data: Dataset,
    train: list[Sample],
    todo: list[Sample],
    previous: list[Path],
    fill: list[float],
    step: MineStep,
    model: CamClassifier,
    device: torch.device,
) -> None:
    model.eval()
    dataset = ErasedImages(todo, data.num_classes, previous, fill)
    loader = DataLoader(
        dataset,
        batch_size=config.mine.batch_size,
        collate_fn=collate_list,
        num_workers=config.data.num_workers,
    )
    vis_ids = {s.id for s in train[: config.mine.visualise]}
    bar = tqdm(
        total=len(todo),
        desc=f"step {step.number} CAMs",
        unit="img",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    for group in _batches(loader, config.mine.batch_size):
        images = torch.stack([item[0] for item in group])
        irn = config.mine.save_cams and config.mine.cam_format == "irn"
        if irn:
            cams, coarse = compute_cams(model, images, config, device, strided=True)
        else:
            cams = compute_cams(model, images, config, device)
        for row, ((image, _, index), cam) in enumerate(zip(group, cams, strict=True)):
            sample = todo[index]
            keys = [k for k in sample.labels]
            own = cam[[k - 1 for k in keys]]
            regions = threshold_regions(own, config.mine.threshold_mode, config.mine.threshold)
            labels = regions_to_label_map(regions, keys).numpy()
            if irn:
                strided_own = coarse[row][[k - 1 for k in keys]].numpy()
                write_irn_cam(step.cam(sample.id, "irn"), keys, strided_own, own.numpy())
            elif config.mine.save_cams:
                _save_npz(
                    step.cam(sample.id),
                    np.array(keys, np.uint8),
                    own.numpy().astype(np.float16),
                )
            if sample.id in vis_ids:
                write_png(step.vis / f"{sample.id}.png", _visual(image, own, labels))
            write_index_png(step.region(sample.id), labels)  # last: marks done
        bar.update(len(group))
    bar.close()


def _external_regions(config: Config, data: Dataset, train: list[Sample], step: MineStep) -> None:
    """Step 1 from CAMs made elsewhere (mine.step1_cams): each image's classes' CAMs,
    thresholded as our own are, written as the step's regions (this rank's share; every
    rank's after the closing barrier)."""
    folder = config.mine.step1_cams
    vis_ids = {s.id for s in train[: config.mine.visualise]}
    todo = [s for s in train[rank() :: world_size()] if not step.region(s.id).is_file()]
    for sample in tqdm(todo, desc="step 1 regions", unit="img", disable=not is_main()):
        image = load_image(sample)
        own = torch.from_numpy(image_cams(folder, sample, data.num_classes, image.shape[:2]))
        regions = threshold_regions(own, config.mine.threshold_mode, config.mine.threshold)
        labels = regions_to_label_map(regions, list(sample.labels)).numpy()
        if sample.id in vis_ids:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            write_png(step.vis / f"{sample.id}.png", _visual(tensor, own, labels))
        write_index_png(step.region(sample.id), labels)  # last: marks done
    barrier()


def _save_npz(path: Path, keys: np.ndarray, cams: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, keys=keys, cams=cams)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _visual(image: torch.Tensor, cams: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Erased image | max CAM over the image's classes as a heat map | mined regions."""
    rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    heat = cams.amax(0).numpy() if len(cams) else np.zeros(labels.shape, np.float32)
    heat_rgb = np.stack([heat, 1 - np.abs(2 * heat - 1), 1 - heat], axis=-1)
    heat_rgb = (0.5 * rgb + 0.5 * 255 * heat_rgb).astype(np.uint8)
    colours = colourise(labels)
    overlay = np.where(labels[..., None] > 0, (0.4 * rgb + 0.6 * colours), rgb).astype(np.uint8)
    return np.concatenate([rgb, heat_rgb, overlay], axis=1)


@torch.no_grad()
def _val_map(config: Config, data: Dataset, model: CamClassifier, device: torch.device):
    """Classification mAP of the step's classifier on the (unerased) val split, if labelled
    (each rank scores its share of the images; the scores are gathered before the AP)."""
    if not data.has_split(config.data.val_split):
        return None
    samples = data.split(config.data.val_split)
    if not samples:
        return None
    model.eval()
    shard = list(range(len(samples)))[rank() :: world_size()]
    dataset = ErasedImages([samples[i] for i in shard], data.num_classes, [], [0, 0, 0])
    loader = DataLoader(
        dataset,
        batch_size=config.mine.batch_size,
        collate_fn=collate_list,
        num_workers=config.data.num_workers,
    )
    scores, targets, order = [], [], []
    for group in _batches(loader, config.mine.batch_size):
        images = to_device(torch.stack([item[0] for item in group]), config, device)
        with autocast(config, device):
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


def union_of_steps(run: RunLayout, image_id: str, steps: list[int]) -> np.ndarray:
    """The union label map of an image's regions over the given steps of the run."""
    union = None
    for step in steps:
        regions = torch.from_numpy(read_index_png(run.step(step).region(image_id)))
        union = regions if union is None else union_label_maps(union, regions)
    return union.numpy()


def _score_regions(data: Dataset, train: list[Sample], run: RunLayout, step: int) -> dict[str, Any]:
    """Region precision / recall of step `step` alone and of the union of steps 1..step (each
    rank counts its share of the images; the counts are summed over ranks)."""
    if not train or any(s.mask is None for s in train):
        return {}
    totals = {"step": np.zeros(3, np.int64), "union": np.zeros(3, np.int64)}
    for sample in train[rank() :: world_size()]:
        regions = read_index_png(run.step(step).region(sample.id))
        target = load_mask(sample, regions.shape, data.num_classes)
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


def _write_union(run: RunLayout, train: list[Sample], steps: list[int]) -> None:
    mine = train[rank() :: world_size()]  # disjoint files per rank
    for sample in tqdm(
        mine, desc="union", unit="img", dynamic_ncols=True, leave=False, disable=not is_main()
    ):
        write_index_png(run.union_region(sample.id), union_of_steps(run, sample.id, steps))


@torch.no_grad()
def _seed_scores(
    config: Config,
    data: Dataset,
    train: list[Sample],
    run: RunLayout,
    steps: list[int],
    fill: list[float],
    device: torch.device,
) -> dict[str, Any] | None:
    """Seed mIoU of each step's CAMs and of their union (the per-pixel max) by the field's
    protocol (evaluation.seed_confusions), swept over the background threshold, on the training
    images with masks. Each step's classifier sees the image as it did: earlier steps' regions
    erased. None when the split has no masks."""
    if not steps or not train or any(s.mask is None for s in train):
        return None
    models = {}
    external = config.mine.step1_cams  # step 1's CAMs are those files, not a classifier's
    for number in steps:
        if number == 1 and external:
            continue
        model = new_classifier(config, data.num_classes, weights="none")
        model.load_state_dict(read_model_file(run.step(number).classifier)[1])
        models[number] = prepare_model(model, config, device).eval()
    views = {
        number: ErasedImages(
            train, data.num_classes, [run.step(s).regions for s in range(1, number)], fill
        )
        for number in steps
    }
    names = [*(f"step {n}" for n in steps), "union"]
    labels = data.num_classes + 1
    totals = np.zeros((len(names), len(SEED_THRESHOLDS), labels, labels), np.int64)
    mine = list(range(len(train)))[rank() :: world_size()]
    for index in tqdm(mine, desc="seed mIoU", unit="img", leave=False, disable=not is_main()):
        sample = train[index]
        keys = list(sample.labels)
        union = None
        for row, number in enumerate(steps):
            image = views[number][index][0][None]
            if number not in models:  # step 1 from mine.step1_cams
                shape = tuple(image.shape[-2:])
                own = torch.from_numpy(image_cams(external, sample, data.num_classes, shape))
            else:
                cams = compute_cams(models[number], image, config, device)
                own = cams[0][[k - 1 for k in keys]]
            union = own if union is None else torch.maximum(union, own)
            target = load_mask(sample, tuple(own.shape[-2:]), data.num_classes)
            totals[row] += seed_confusions(own.numpy(), keys, target, SEED_THRESHOLDS, labels - 1)
        totals[-1] += seed_confusions(union.numpy(), keys, target, SEED_THRESHOLDS, labels - 1)
    totals = all_reduce_sum(torch.from_numpy(totals)).numpy()
    result = {name: seed_miou_curve(totals[row], SEED_THRESHOLDS) for row, name in enumerate(names)}
    print(
        "seed mIoU, best background threshold (an oracle, chosen on ground truth): "
        + ", ".join(
            f"{name} {r['best_mIoU']:.3f} at {r['best_threshold']:.2f}"
            for name, r in result.items()
            if r["best_mIoU"] is not None
        )
    )
    return result
