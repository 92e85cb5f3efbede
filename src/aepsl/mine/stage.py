"""`aepsl mine`: K steps of adversarial erasing (ALGORITHM.md, stage 1).

Layout of OUT/mine (each file written atomically; a re-run skips finished work):
  manifest.json              hash of the settings that produced this folder
  mean_pixel.json            the fill colour of erased pixels
  step<t>/checkpoint.pt      resumable training state (removed when the step's training ends)
  step<t>/classifier.pt      the trained classifier's state dict
  step<t>/train.json         final training loss of the step
  step<t>/regions/<id>.png   regions mined at step t (k = class, 255 = conflict)
  step<t>/cams/<id>.npz      with mine.save_cams: keys, cams (float16, K x H x W, in [0, 1])
  step<t>/vis/<id>.png       erased image | CAM | regions, for a few images
  step<t>/done.json          the step's metrics, written last
  regions/<id>.png           union over steps, same encoding
  metrics.json               per step: loss, val mAP, region precision / recall

Under `torchrun` every process trains the same classifier on its share of each global batch
(DDP), extracts the CAMs and regions of its share of the images, and rank 0 alone writes the
shared files (checkpoints, JSON, tensorboard).
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from aepsl.config import Config, stage_settings
from aepsl.data.datasets import Dataset, Sample, load_dataset, load_mask
from aepsl.errors import UserError
from aepsl.evaluation import average_precision, region_scores
from aepsl.io import (
    PALETTE,
    atomic_path,
    claim_folder,
    load_checkpoint,
    mark_complete,
    read_index_png,
    save_checkpoint,
    settings_digest,
    write_index_png,
    write_json,
    write_png,
)
from aepsl.mine.cam import (
    max_normalise,
    regions_to_label_map,
    threshold_regions,
    union_label_maps,
    upsample_relu,
)
from aepsl.mine.data import ErasedImages, ShuffledShard, collate_list, mean_pixel
from aepsl.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from aepsl.models.classifier import CamClassifier, build_classifier
from aepsl.runtime import (
    all_gather,
    all_reduce_sum,
    autocast,
    barrier,
    check_precision,
    data_parallel,
    grad_scaler,
    is_main,
    on_main,
    per_rank_batch,
    prepare_model,
    rank,
    seed_everything,
    seed_rank,
    select_device,
    summary_writer,
    to_device,
    world_size,
)


def settings_hash(config: Config) -> str:
    """Hash of every setting that changes what `mine` writes."""
    relevant = stage_settings(config, "mine", {"visualise", "checkpoint_every"})
    return settings_digest(relevant)


def build_optimizer(model: CamClassifier, config: Config) -> torch.optim.SGD:
    """SGD with the new layers at mine.lr and a pretrained backbone at backbone_lr_mult x it."""
    cfg = config.mine
    pretrained = config.model.weights != "none"
    new = {id(p) for p in model.new_parameters()}
    backbone = [p for p in model.parameters() if id(p) not in new]
    return torch.optim.SGD(
        [
            {"params": backbone, "lr": cfg.lr * (cfg.backbone_lr_mult if pretrained else 1.0)},
            {"params": model.new_parameters(), "lr": cfg.lr},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def step_dir(out: Path, step: int) -> Path:
    return out / "mine" / f"step{step}"


def run_mine(config: Config, out: Path) -> dict[str, Any]:
    """Run (or resume) all erasing steps; returns the metrics written to OUT/mine/metrics.json."""
    device = select_device(config)
    check_precision(config, device)
    per_rank_batch(config.mine.batch_size, "mine.batch_size")
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    train = data.split(config.data.train_split)
    mine_dir = out / "mine"
    digest = settings_hash(config)
    if on_main(claim_folder, mine_dir, digest):
        print(f"mine: finished for these settings in {mine_dir}; skipped")
        return json.loads((mine_dir / "metrics.json").read_text())
    fill = on_main(_mean_pixel, mine_dir, train)
    writer = summary_writer(str(mine_dir / "tensorboard"))
    steps: list[dict[str, Any]] = []
    first_loss = None
    for step in range(1, config.mine.steps + 1):
        folder = step_dir(out, step)
        done = folder / "done.json"
        if on_main(done.is_file):
            record = json.loads(done.read_text())
        else:
            previous = [step_dir(out, s) / "regions" for s in range(1, step)]
            model, loss = _train_step(
                config, data, train, previous, fill, folder, device, step, writer
            )
            record = {"step": step, "train_loss": loss}
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
                _extract_regions(config, data, train, previous, fill, folder, model, device)
                record["val_mAP"] = _val_map(config, data, model, device)
                record.update(_score_regions(data, train, out, step))
            on_main(write_json, done, record)
        first_loss = record["train_loss"] if first_loss is None else first_loss
        steps.append(record)
        print(_step_line(record))
        if "stopped" in record:
            break
    used = [r["step"] for r in steps if "stopped" not in r]
    _write_union(out, train, used)
    barrier()  # every rank's union maps written
    metrics = {
        "steps": steps,
        "steps_used": used,
        "threshold_mode": config.mine.threshold_mode,
        "threshold": config.mine.threshold,
        "mean_pixel": fill,
        "region_metrics": "precision = correctly mined / mined pixels; recall = correctly "
        "mined / ground-truth object pixels; conflicts count as mined, never correct",
    }
    if is_main():
        write_json(mine_dir / "metrics.json", metrics)
        mark_complete(mine_dir, digest)
    writer.close()
    barrier()
    return metrics


def _mean_pixel(mine_dir: Path, train: list[Sample]) -> list[float]:
    path = mine_dir / "mean_pixel.json"
    if path.is_file():
        return json.loads(path.read_text())["mean_pixel"]
    fill = mean_pixel(train)
    write_json(path, {"mean_pixel": fill})
    return fill


def _step_line(record: dict[str, Any]) -> str:
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


def _seed_for(config: Config, step: int, epoch: int) -> int:
    """A seed per (step, epoch), so a resumed epoch replays the uninterrupted run exactly."""
    return config.seed * 1_000_003 + step * 1009 + epoch


def _train_step(
    config: Config,
    data: Dataset,
    train: list[Sample],
    previous: list[Path],
    fill: list[float],
    folder: Path,
    device: torch.device,
    step: int,
    writer: Any,
) -> tuple[CamClassifier, float]:
    """Train a fresh classifier (same initialisation every step) on the erased images.

    With N processes (DDP) each trains on batch_size / N items of every global batch of the
    same seeded permutation; per-rank mean losses, averaged over ranks by DDP, equal the mean
    over the global batch, so N processes follow the one-process run (batch norms synced)."""
    cfg = config.mine
    seed_everything(config.seed)  # the same initial weights at every step, as the paper says
    model = build_classifier(
        config.model.backbone,
        config.model.weights,
        data.num_classes,
        config.model.cam_output_stride,
    )
    model = prepare_model(model, config, device)
    final = folder / "classifier.pt"
    if on_main(final.is_file):
        model.load_state_dict(load_checkpoint(final))
        return model, json.loads((folder / "train.json").read_text())["train_loss"]

    optimizer = build_optimizer(model, config)
    dataset = ErasedImages(train, data.num_classes, previous, fill, crop=config.data.image_size)
    world = world_size()
    if world > 1 and len(dataset) < cfg.batch_size:
        raise UserError(
            f"mine.batch_size={cfg.batch_size} is more than the {len(dataset)} training images; "
            "with several processes every global batch must be complete"
        )
    per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, total - 1) / total) ** 0.9
    )
    scaler = grad_scaler(config, device)
    start_epoch = 0
    checkpoint = folder / "checkpoint.pt"
    if on_main(checkpoint.is_file):
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        print(f"step {step}: resuming training at epoch {start_epoch + 1}/{cfg.epochs}")

    net = model  # the module itself; `model` may be its DDP wrapper
    model = data_parallel(net, device)
    epoch_loss = math.nan
    bar = tqdm(
        total=total,
        initial=start_epoch * per_epoch,
        desc=f"step {step} train",
        unit="batch",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed_rank(_seed_for(config, step, epoch))  # dropout; crops are seeded per sample
            dataset.epoch_seed = _seed_for(config, step, epoch)
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size // world,
                sampler=ShuffledShard(
                    len(dataset), _seed_for(config, step, epoch), cfg.batch_size, rank(), world
                ),
                drop_last=len(dataset) > cfg.batch_size,
                num_workers=config.data.num_workers,
                pin_memory=device.type == "cuda",
            )
            model.train()
            losses = []
            for images, targets, _ in loader:
                images, targets = to_device(images, config, device), targets.to(device)
                with autocast(config, device):
                    logits = model(images)
                loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                # the global batch's mean loss (equal shards), the same number on every rank
                losses.append(all_reduce_sum(loss.detach()).item() / world)
                writer.add_scalar(f"step{step}/loss", losses[-1], scheduler.last_epoch)
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            epoch_loss = float(np.mean(losses))
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(
                    f"step {step}: training loss is {epoch_loss} at epoch {epoch + 1}"
                )
            if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs and is_main():
                save_checkpoint(
                    checkpoint,
                    {
                        "model": net.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                    },
                )
    finally:
        bar.close()  # before any error line, so it starts a line of its own
    if math.isnan(epoch_loss):  # resumed after the last epoch had already run
        epoch_loss = float(json.loads((folder / "train.json").read_text())["train_loss"])

    def save() -> None:
        save_checkpoint(final, net.state_dict())
        write_json(folder / "train.json", {"train_loss": round(epoch_loss, 6)})
        checkpoint.unlink(missing_ok=True)

    on_main(save)
    return net, round(epoch_loss, 6)


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
) -> torch.Tensor:
    """Max-normalised CAMs (N, C, H, W) of all classes from one pass per scale (and flip)."""
    size = images.shape[-2:]
    images = to_device(images, config, device)
    total = None
    for scale in config.mine.cam_scales:
        scaled = (
            images
            if scale == 1
            else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        variants = [scaled, scaled.flip(-1)] if config.mine.cam_flip else [scaled]
        for k, variant in enumerate(variants):
            with autocast(config, device):
                maps = model.class_maps(variant)
            maps = upsample_relu(maps, size)
            maps = maps.flip(-1) if k == 1 else maps
            total = maps if total is None else total + maps
    return max_normalise(total).cpu()


def _extract_regions(
    config: Config,
    data: Dataset,
    train: list[Sample],
    previous: list[Path],
    fill: list[float],
    folder: Path,
    model: CamClassifier,
    device: torch.device,
) -> None:
    """Write the step's regions of this rank's share of the images (every rank's, after the
    closing barrier)."""
    regions_dir = folder / "regions"
    mine = train[rank() :: world_size()]  # disjoint files per rank
    todo = [s for s in mine if not (regions_dir / f"{s.id}.png").is_file()]
    if todo:
        _extract_todo(config, data, train, todo, previous, fill, folder, model, device)
    barrier()


def _extract_todo(
    config: Config,
    data: Dataset,
    train: list[Sample],
    todo: list[Sample],
    previous: list[Path],
    fill: list[float],
    folder: Path,
    model: CamClassifier,
    device: torch.device,
) -> None:
    regions_dir = folder / "regions"
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
        desc=f"{folder.name} CAMs",
        unit="img",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    for group in _batches(loader, config.mine.batch_size):
        images = torch.stack([item[0] for item in group])
        cams = compute_cams(model, images, config, device)
        for (image, _, index), cam in zip(group, cams, strict=True):
            sample = todo[index]
            keys = [k for k in sample.labels]
            own = cam[[k - 1 for k in keys]]
            regions = threshold_regions(own, config.mine.threshold_mode, config.mine.threshold)
            labels = regions_to_label_map(regions, keys).numpy()
            if config.mine.save_cams:
                _save_npz(
                    folder / "cams" / f"{sample.id}.npz",
                    np.array(keys, np.uint8),
                    own.numpy().astype(np.float16),
                )
            if sample.id in vis_ids:
                write_png(folder / "vis" / f"{sample.id}.png", _visual(image, own, labels))
            write_index_png(regions_dir / f"{sample.id}.png", labels)  # last: marks done
        bar.update(len(group))
    bar.close()


def _save_npz(path: Path, keys: np.ndarray, cams: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, keys=keys, cams=cams)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _visual(image: torch.Tensor, cams: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Erased image | max CAM over the image's classes as a heat map | mined regions."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    heat = cams.amax(0).numpy() if len(cams) else np.zeros(labels.shape, np.float32)
    heat_rgb = np.stack([heat, 1 - np.abs(2 * heat - 1), 1 - heat], axis=-1)
    heat_rgb = (0.5 * rgb + 0.5 * 255 * heat_rgb).astype(np.uint8)
    colours = np.array(PALETTE, np.uint8).reshape(256, 3)[labels]
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


def union_of_steps(out: Path, image_id: str, steps: list[int]) -> np.ndarray:
    """The union label map of an image's regions over the given steps of run `out`."""
    union = None
    for step in steps:
        regions = torch.from_numpy(
            read_index_png(step_dir(out, step) / "regions" / f"{image_id}.png")
        )
        union = regions if union is None else union_label_maps(union, regions)
    return union.numpy()


def _score_regions(data: Dataset, train: list[Sample], out: Path, step: int) -> dict[str, Any]:
    """Region precision / recall of step `step` alone and of the union of steps 1..step (each
    rank counts its share of the images; the counts are summed over ranks)."""
    if not train or any(s.mask is None for s in train):
        return {}
    totals = {"step": np.zeros(3, np.int64), "union": np.zeros(3, np.int64)}
    for sample in train[rank() :: world_size()]:
        regions = read_index_png(step_dir(out, step) / "regions" / f"{sample.id}.png")
        target = load_mask(sample, regions.shape, data.num_classes)
        totals["step"] += region_scores(regions, target)
        totals["union"] += region_scores(
            union_of_steps(out, sample.id, list(range(1, step + 1))), target
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


def _write_union(out: Path, train: list[Sample], steps: list[int]) -> None:
    folder = out / "mine" / "regions"
    mine = train[rank() :: world_size()]  # disjoint files per rank
    for sample in tqdm(
        mine, desc="union", unit="img", dynamic_ncols=True, leave=False, disable=not is_main()
    ):
        write_index_png(folder / f"{sample.id}.png", union_of_steps(out, sample.id, steps))
