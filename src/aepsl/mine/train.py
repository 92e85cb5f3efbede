"""Training one erasing step's classifier: multi-label BCE on the images with the earlier steps'
regions erased, from the same initial weights at every step.

Under `torchrun` every process trains on its share of each global batch (DDP); N processes
follow the one-process run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aepsl.config import Config, MineConfig
from aepsl.data.datasets import Sample
from aepsl.errors import UserError
from aepsl.io import read_json
from aepsl.layout import MineStep, RunLayout
from aepsl.mine.context import MineContext
from aepsl.mine.data import ErasedImages
from aepsl.models.classifier import CamClassifier, build_classifier
from aepsl.models.saved import model_record, read_model_file
from aepsl.runtime import (
    all_reduce_sum,
    on_main,
    prepare_model,
    seed_everything,
    world_size,
)
from aepsl.training import Plan, Trainer, batches_per_epoch, finish, fit, poly, sgd


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


def base_seed(config: Config, step: MineStep) -> int:
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
        epoch_seed=lambda epoch: base_seed(config, step) + epoch,
        checkpoint=step.checkpoint,
        checkpoint_every=cfg.checkpoint_every * per_epoch,
        tensorboard=run.mine_tensorboard,
    )


def train_step(ctx: MineContext, step: MineStep) -> tuple[CamClassifier, float]:
    """Train a fresh classifier (same initialisation every step) on the erased images, or load
    the one a finished step saved; returns it with its final epoch's mean loss.

    With N processes (DDP) each trains on batch_size / N items of every global batch of the
    same seeded permutation; per-rank mean losses, averaged over ranks by DDP, equal the mean
    over the global batch, so N processes follow the one-process run (batch norms synced)."""
    config, cfg, run = ctx.config, ctx.config.mine, ctx.run
    seed_everything(config.seed)  # the same initial weights at every step, as the paper says
    model = prepare_model(new_classifier(config, ctx.data.num_classes), config, ctx.device)
    if on_main(step.classifier.is_file):
        model.load_state_dict(read_model_file(step.classifier)[1])
        return model, read_json(step.train_log, run.redo("mine"))["train_loss"]

    dataset = ErasedImages(
        ctx.train,
        ctx.data.num_classes,
        ctx.erased_before(step),
        ctx.fill,
        crop=config.data.image_size,
        seed=base_seed(config, step),
    )
    if world_size() > 1 and len(dataset) < cfg.batch_size:
        raise UserError(
            f"mine.batch_size={cfg.batch_size} is more than the {len(dataset)} training images; "
            "with several processes every global batch must be complete"
        )
    # The decay spans ceil(n / batch) steps an epoch, as the loop of earlier versions counted.
    epochs = step_epochs(cfg, ctx.train)
    schedule = -(-len(dataset) // cfg.batch_size) * epochs
    trainer = classifier_trainer(model, config, ctx.device, schedule)
    plan = classifier_plan(config, step, run, len(dataset), epochs)
    result = fit(trainer, dataset, plan)
    loss = round(result.epoch_mean, 6)
    record = model_record(
        model,
        "cam_classifier",
        config.model.backbone,
        ctx.data.num_classes,
        cam_head=config.model.cam_head,
    )
    log = {"train_loss": loss, "epochs": epochs, "iterations": plan.iterations}
    on_main(finish, step.checkpoint, step.classifier, record, step.train_log, log)
    return model, loss


def load_step_classifiers(ctx: MineContext, steps: list[int]) -> dict[int, torch.nn.Module]:
    """The trained classifiers of `steps` in eval mode (step 1 left out when its CAMs came from
    mine.step1_cams)."""
    models = {}
    for number in steps:
        if number == 1 and ctx.config.mine.step1_cams:
            continue
        model = new_classifier(ctx.config, ctx.data.num_classes, weights="none")
        model.load_state_dict(read_model_file(ctx.run.step(number).classifier)[1])
        models[number] = prepare_model(model, ctx.config, ctx.device).eval()
    return models
