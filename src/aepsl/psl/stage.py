"""`aepsl train`: prohibitive segmentation learning on the pseudo labels (ALGORITHM.md, stage 3).

Reads OUT/labels/<id>.png; writes OUT/train/checkpoint.pt (resumable, every
train.checkpoint_every iterations), OUT/train/model.pt (the final state dict),
OUT/train/tensorboard/, and, when the val split has ground truth, OUT/predict/<id>.png,
OUT/predict_crf/<id>.png and OUT/train/metrics.json (val mIoU without and with CRF).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from aepsl.config import Config, stage_settings
from aepsl.data.datasets import load_dataset
from aepsl.errors import UserError
from aepsl.io import (
    claim_folder,
    load_checkpoint,
    mark_complete,
    save_checkpoint,
    settings_digest,
    write_json,
)
from aepsl.labels.stage import settings_hash as labels_settings_hash
from aepsl.models.segnet import SegNet, build_segnet
from aepsl.psl.data import PseudoLabelled, ResumableSampler
from aepsl.psl.loss import psl_loss
from aepsl.runtime import (
    autocast,
    check_precision,
    prepare_model,
    seed_everything,
    select_device,
    to_device,
)


def settings_hash(config: Config) -> str:
    """Hash of every setting that changes the trained network, the pseudo labels' included."""
    relevant = stage_settings(config, "train", {"checkpoint_every"})
    relevant["labels"] = labels_settings_hash(config)
    return settings_digest(relevant)


def learning_rate_factor(config: Config, iteration: int) -> float:
    cfg = config.train
    if cfg.schedule == "poly":
        return (1 - min(iteration, cfg.iterations - 1) / cfg.iterations) ** cfg.poly_power
    return cfg.step_gamma ** (iteration // cfg.step_size)


def build_optimizer(model: SegNet, config: Config) -> torch.optim.SGD:
    cfg = config.train
    new = {id(p) for p in model.new_parameters()}
    return torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if id(p) not in new], "lr": cfg.lr},
            {"params": model.new_parameters(), "lr": cfg.lr * cfg.new_layer_lr_mult},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def run_train(config: Config, out: Path) -> SegNet:
    """Train (or resume, or skip when finished) the segmentation network; returns it."""
    cfg = config.train
    device = select_device(config)
    check_precision(config, device)
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    train = data.split(config.data.train_split)
    folder = out / "train"
    digest = settings_hash(config)
    finished = claim_folder(folder, digest)
    seed_everything(config.seed)
    model = prepare_model(
        build_segnet(config.model.backbone, config.model.weights, data.num_classes), config, device
    )
    final = folder / "model.pt"
    if finished:
        print(f"train: finished for these settings in {folder}; skipped")
        model.load_state_dict(load_checkpoint(final))
        return model

    labels_dir = out / "labels"
    if not labels_dir.is_dir():
        raise UserError(f"{labels_dir}: pseudo labels missing; run `aepsl labels` with this --out")
    dataset = PseudoLabelled(
        train, data.num_classes, labels_dir, cfg.crop_size, cfg.scale_range, config.seed
    )
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: learning_rate_factor(config, it)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    iteration = 0
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration = int(state["iteration"])
        print(f"train: resuming at iteration {iteration}/{cfg.iterations}")

    batches_per_epoch = max(1, len(dataset) // cfg.batch_size)
    writer = SummaryWriter(str(folder / "tensorboard"))
    bar = tqdm(total=cfg.iterations, initial=iteration, desc="train", unit="it", dynamic_ncols=True)
    model.train()
    last: dict[str, float] = {}
    while iteration < cfg.iterations:
        epoch, done_in_epoch = divmod(iteration, batches_per_epoch)
        dataset.epoch = epoch
        sampler = ResumableSampler(len(dataset), config.seed, epoch, done_in_epoch * cfg.batch_size)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=len(dataset) >= cfg.batch_size,
            num_workers=config.data.num_workers,
            pin_memory=device.type == "cuda",
        )
        for images, pseudo, targets in loader:
            images = to_device(images, config, device)
            pseudo, targets = pseudo.to(device), targets.to(device)
            with autocast(config, device):
                scores, class_logits = model(images)
            use_psl = cfg.psl and iteration >= cfg.psl_warmup
            loss, parts = psl_loss(scores.float(), class_logits.float(), pseudo, targets, use_psl)
            if not math.isfinite(parts["total"]):
                raise FloatingPointError(
                    f"train: loss is {parts['total']} at iteration {iteration + 1}; the last good "
                    f"checkpoint is {checkpoint}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            last = parts
            for key, value in parts.items():
                writer.add_scalar(f"train/{key}", value, iteration)
            bar.update()
            bar.set_postfix(loss=f"{parts['total']:.4f}")
            if iteration % cfg.checkpoint_every == 0 and iteration < cfg.iterations:
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "iteration": iteration,
                    },
                )
            if iteration >= cfg.iterations:
                break
    bar.close()
    writer.close()
    save_checkpoint(final, model.state_dict())
    write_json(folder / "train.json", {"iterations": iteration, "final_loss": last})
    checkpoint.unlink(missing_ok=True)
    mark_complete(folder, digest)
    return model
