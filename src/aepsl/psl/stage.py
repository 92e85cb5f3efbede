"""`aepsl train`: prohibitive segmentation learning on the pseudo labels (ALGORITHM.md, stage 3).

Reads OUT/labels/<id>.png; writes OUT/train/checkpoint.pt (resumable, every
train.checkpoint_every iterations), OUT/train/model.pt (the final state dict),
OUT/train/tensorboard/, and, when the val split has ground truth, OUT/predict/<id>.png,
OUT/predict_crf/<id>.png and OUT/train/metrics.json (val mIoU without and with CRF).

Under `torchrun` every process trains on its share of each global batch (DDP, batch norms
synced) and rank 0 alone writes checkpoints, tensorboard and model.pt.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from aepsl.config import Config, stage_settings
from aepsl.data.datasets import load_dataset
from aepsl.errors import UserError
from aepsl.io import (
    IGNORE,
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
from aepsl.psl.loss import (
    classification_loss,
    prohibitive_mask,
    psl_loss,
    segmentation_loss,
    upsample_scores,
)
from aepsl.runtime import (
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


def global_psl_loss(
    scores: torch.Tensor,
    class_logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    image_labels: torch.Tensor,
    use_psl: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """psl_loss of this rank's share of the global batch, such that DDP's average over ranks
    is the one-process loss of the global batch; the logged parts are the global batch's.

    The pseudo-label term is a mean over *labelled* pixels, which differ in number between the
    shares: this rank's sum is divided by the labelled pixels of the whole global batch (the
    count all-reduced) times the number of ranks. The classification term (a mean over images)
    and the S_hat term (every pixel labelled) need nothing, the shares being of equal size.
    One process: exactly psl_loss.
    """
    world = world_size()
    if world == 1:
        return psl_loss(scores, class_logits, pseudo_labels, image_labels, use_psl)
    scores = upsample_scores(scores, tuple(pseudo_labels.shape[-2:]))
    labelled = (pseudo_labels != IGNORE).sum().float()
    share = labelled * world / all_reduce_sum(labelled).clamp(min=1)
    parts = {
        "cls": classification_loss(class_logits, image_labels),
        "seg": segmentation_loss(scores, pseudo_labels) * share,
    }
    if use_psl:
        mask = prohibitive_mask(scores, torch.sigmoid(class_logits), image_labels)
        parts["psl"] = segmentation_loss(scores, mask)
    total = torch.stack(list(parts.values())).sum()
    values = all_reduce_sum(torch.stack([*parts.values(), total]).detach()) / world
    return total, dict(zip([*parts, "total"], values.tolist(), strict=True))


def run_train(config: Config, out: Path) -> SegNet:
    """Train (or resume, or skip when finished) the segmentation network; returns it.

    With N processes (DDP) each trains on train.batch_size / N items of every global batch of
    the same seeded permutation, with the crops one process would draw."""
    cfg = config.train
    device = select_device(config)
    check_precision(config, device)
    per_rank_batch(cfg.batch_size, "train.batch_size")
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    train = data.split(config.data.train_split)
    folder = out / "train"
    digest = settings_hash(config)
    finished = on_main(claim_folder, folder, digest)
    seed_everything(config.seed)
    model = prepare_model(
        build_segnet(
            config.model.backbone,
            config.model.weights,
            data.num_classes,
            config.model.seg_output_stride,
        ),
        config,
        device,
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
    world = world_size()
    if world > 1 and len(dataset) < cfg.batch_size:
        raise UserError(
            f"train.batch_size={cfg.batch_size} is more than the {len(dataset)} training images; "
            "with several processes every global batch must be complete"
        )
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: learning_rate_factor(config, it)
    )
    scaler = grad_scaler(config, device)
    iteration = 0
    checkpoint = folder / "checkpoint.pt"
    if on_main(checkpoint.is_file):
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        iteration = int(state["iteration"])
        print(f"train: resuming at iteration {iteration}/{cfg.iterations}")

    batches_per_epoch = max(1, len(dataset) // cfg.batch_size)
    writer = summary_writer(str(folder / "tensorboard"))
    bar = tqdm(
        total=cfg.iterations,
        initial=iteration,
        desc="train",
        unit="it",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    net = model  # the module itself; `model` may be its DDP wrapper
    model = data_parallel(net, device)
    if world > 1:
        seed_rank(config.seed)  # dropout: a different stream per rank
    model.train()
    last: dict[str, float] = {}
    try:
        while iteration < cfg.iterations:
            epoch, done_in_epoch = divmod(iteration, batches_per_epoch)
            dataset.epoch = epoch
            sampler = ResumableSampler(
                len(dataset),
                config.seed,
                epoch,
                done_in_epoch * cfg.batch_size,
                batch_size=cfg.batch_size,
                rank=rank(),
                world_size=world,
            )
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size // world,
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
                loss, parts = global_psl_loss(
                    scores.float(), class_logits.float(), pseudo, targets, use_psl
                )
                if not math.isfinite(parts["total"]):
                    raise FloatingPointError(
                        f"train: loss is {parts['total']} at iteration {iteration + 1}; the last "
                        f"good checkpoint is {checkpoint}"
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
                due = iteration % cfg.checkpoint_every == 0 and iteration < cfg.iterations
                if due and not all(torch.isfinite(p).all() for p in net.parameters()):
                    raise FloatingPointError(
                        f"train: weights are not finite after iteration {iteration}; the last good "
                        f"checkpoint is {checkpoint}"
                    )
                if due and is_main():
                    save_checkpoint(
                        checkpoint,
                        {
                            "model": net.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "iteration": iteration,
                        },
                    )
                if iteration >= cfg.iterations:
                    break
    finally:
        bar.close()  # before any error line, so it starts a line of its own
    writer.close()
    if is_main():
        save_checkpoint(final, net.state_dict())
        write_json(folder / "train.json", {"iterations": iteration, "final_loss": last})
        checkpoint.unlink(missing_ok=True)
        mark_complete(folder, digest)
    barrier()  # model.pt written before any rank reads it
    return net
