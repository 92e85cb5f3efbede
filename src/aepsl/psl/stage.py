"""`aepsl train`: prohibitive segmentation learning on the pseudo labels (docs/method.md, stage 3).

Reads OUT/labels/<id>.png; writes OUT/train (layout.py): checkpoint.pt (resumable, every
train.checkpoint_every iterations), model.pt (the trained network), train.json, tensorboard/.

Under `torchrun` every process trains on its share of each global batch (DDP, batch norms
synced) and rank 0 alone writes checkpoints, tensorboard and model.pt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aepsl.config import Config
from aepsl.data.datasets import Dataset, check_inputs, load_dataset
from aepsl.errors import UserError
from aepsl.external import check_pseudo_labels
from aepsl.labelmap import IGNORE
from aepsl.layout import RunLayout
from aepsl.models.saved import model_record, read_model_file
from aepsl.models.segnet import SegNet, build_segnet
from aepsl.psl.data import PseudoLabelled
from aepsl.psl.loss import (
    classification_loss,
    exclude_padding,
    prohibitive_mask,
    psl_loss,
    segmentation_loss,
    upsample_scores,
)
from aepsl.runtime import (
    all_reduce_sum,
    barrier,
    check_precision,
    on_main,
    per_rank_batch,
    prepare_model,
    seed_everything,
    select_device,
    world_size,
)
from aepsl.training import Plan, Trainer, finish, fit, poly, sgd


def learning_rate_factor(config: Config, iteration: int) -> float:
    cfg = config.train
    if cfg.schedule == "poly":
        return poly(iteration, cfg.iterations, cfg.poly_power)
    return cfg.step_gamma ** (iteration // cfg.step_size)


def global_psl_loss(
    scores: torch.Tensor,
    class_logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    image_labels: torch.Tensor,
    use_psl: bool,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """psl_loss of this rank's share of the global batch, such that DDP's average over ranks
    is the one-process loss of the global batch; the logged parts are the global batch's.

    Both cross-entropies are means over pixels that differ in number between the shares: the
    pseudo-label term over *labelled* pixels, the S_hat term over the crops' *real* pixels
    (`valid`; padding is excluded from both). This rank's sum is divided by the count of the
    whole global batch (all-reduced) times the number of ranks. The classification term (a
    mean over images) needs nothing, the shares being of equal size. One process: exactly
    psl_loss.
    """
    world = world_size()
    if world == 1:
        return psl_loss(scores, class_logits, pseudo_labels, image_labels, use_psl, valid)
    scores = upsample_scores(scores, tuple(pseudo_labels.shape[-2:]))
    pseudo_labels = exclude_padding(pseudo_labels, valid)
    real = valid if valid is not None else torch.ones_like(pseudo_labels, dtype=torch.bool)
    counts = torch.stack([(pseudo_labels != IGNORE).sum(), real.sum()]).float()
    share = counts * world / all_reduce_sum(counts).clamp(min=1)
    parts = {
        "cls": classification_loss(class_logits, image_labels),
        "seg": segmentation_loss(scores, pseudo_labels) * share[0],
    }
    if use_psl:
        mask = prohibitive_mask(scores, torch.sigmoid(class_logits), image_labels)
        parts["psl"] = segmentation_loss(scores, exclude_padding(mask, valid)) * share[1]
    total = torch.stack(list(parts.values())).sum()
    values = all_reduce_sum(torch.stack([*parts.values(), total]).detach()) / world
    return total, dict(zip([*parts, "total"], values.tolist(), strict=True))


def epoch_iterations(epochs: float, images: int, batch_size: int) -> int:
    """round(epochs x images / batch_size)."""
    return int(epochs * images / batch_size + 0.5)


def with_length(config: Config, images: int) -> Config:
    """`config` with train.iterations from train.epochs when that is set: round(epochs x
    images / batch_size), at least train.min_iterations and 1."""
    cfg = config.train
    if cfg.epochs is None:
        return config
    by_epochs = epoch_iterations(cfg.epochs, images, cfg.batch_size)
    iterations = max(1, cfg.min_iterations, by_epochs)
    if cfg.psl and cfg.psl_warmup >= iterations:
        length = (
            f"train.min_iterations={cfg.min_iterations} sets"
            if cfg.min_iterations > by_epochs
            else f"train.epochs={cfg.epochs} gives for {images} images"
        )
        raise UserError(
            f"train.psl_warmup={cfg.psl_warmup} is not below the {iterations} iterations "
            f"{length}: PSL would never start"
        )
    resolved = config.model_copy(deep=True)
    resolved.train.iterations = iterations
    return resolved


def segnet_trainer(model: SegNet, config: Config, device: torch.device) -> Trainer:
    """The PSL step: pretrained layers at train.lr, new ones at new_layer_lr_mult x it; the
    prohibitive term from iteration train.psl_warmup on (with train.psl). The batch is
    (images, pseudo labels, image labels[, valid mask]): PseudoLabelled's; without the valid
    mask (benchmarks' random batches) every pixel is real."""
    cfg = config.train

    def loss(
        outputs: tuple[torch.Tensor, torch.Tensor], rest: list[torch.Tensor], iteration: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        scores, class_logits = outputs
        pseudo, targets, *valid = rest
        use_psl = cfg.psl and iteration >= cfg.psl_warmup
        return global_psl_loss(
            scores.float(), class_logits.float(), pseudo, targets, use_psl, *valid
        )

    new_lr = cfg.lr * cfg.new_layer_lr_mult
    optimizer = sgd(model, cfg.lr, new_lr, cfg.momentum, cfg.weight_decay)
    return Trainer(
        model, optimizer, lambda it: learning_rate_factor(config, it), loss, config, device
    )


def segnet_plan(config: Config, run: RunLayout) -> Plan:
    """train.iterations steps, checkpointed every train.checkpoint_every."""
    cfg = config.train
    return Plan(
        name="train",
        iterations=cfg.iterations,
        batch_size=cfg.batch_size,
        epoch_seed=lambda epoch: config.seed * 100_003 + epoch,
        checkpoint=run.train_checkpoint,
        checkpoint_every=cfg.checkpoint_every,
        tensorboard=run.train_tensorboard,
    )


def _pseudo_labelled(
    config: Config, data: Dataset, run: RunLayout, model: SegNet
) -> PseudoLabelled:
    """The training split with its pseudo labels (RUN/labels, or labels.dir: made elsewhere,
    their files' names, sizes and mtimes in the settings hash), checked on every rank, cropped
    as the model file will record."""
    cfg = config.train
    train = data.split(config.data.train_split)
    source = Path(config.labels.dir) if config.labels.dir else run.labels
    if not source.is_dir():
        raise UserError(f"{run.labels}: pseudo labels missing; run `aepsl labels` with this --out")
    check_pseudo_labels(source, train, data.num_classes)  # every rank: an error on each
    dataset = PseudoLabelled(
        train,
        data.num_classes,
        source,
        cfg.crop_size,
        cfg.scale_range,
        config.seed,
        input_size=model.input_size,
        min_side=model.input_min_side,
    )
    if world_size() > 1 and len(dataset) < cfg.batch_size:
        raise UserError(
            f"train.batch_size={cfg.batch_size} is more than the {len(dataset)} training images; "
            "with several processes every global batch must be complete"
        )
    return dataset


def run_train(config: Config, out: Path) -> SegNet:
    """Train (or resume, or skip when finished) the segmentation network; returns it.

    With N processes (DDP) each trains on train.batch_size / N items of every global batch of
    the same seeded permutation, with the crops one process would draw."""
    cfg = config.train
    device = select_device(config)
    check_precision(config, device)
    per_rank_batch(cfg.batch_size, "train.batch_size")
    data = load_dataset(config.data)
    data.training_split(config.data.train_split)  # fails before the folder is claimed
    run = RunLayout(out, config)
    run.check_input("labels")
    finished = on_main(run.finished, "train", [run.model, run.train_log])
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
    # Large images are reduced to train.image_size and small ones enlarged to the crop size, in
    # training and prediction (the model file records both, so `aepsl predict` does the same).
    model.input_size = cfg.image_size or 0
    model.input_min_side = cfg.crop_size if cfg.upscale_small else 0
    if finished:
        model.load_state_dict(read_model_file(run.model)[1])
        return model
    check_inputs(data, config.data)  # every header and mask size, before hours of training

    dataset = _pseudo_labelled(config, data, run, model)
    config = with_length(config, len(dataset))  # train.epochs -> iterations (hashes unchanged)
    if cfg.epochs is not None:
        short = epoch_iterations(cfg.epochs, len(dataset), cfg.batch_size) < cfg.min_iterations
        floor = f" (raised to train.min_iterations={cfg.min_iterations})" if short else ""
        print(
            f"train: {cfg.epochs} epochs of {len(dataset)} images = "
            f"{config.train.iterations} it{floor}"
        )
    result = fit(segnet_trainer(model, config, device), dataset, segnet_plan(config, run))

    def save() -> None:
        record = {"iterations": result.iterations, "final_loss": result.last}
        record.update(images=len(dataset), batch_size=cfg.batch_size, epochs=cfg.epochs)
        saved = model_record(
            model, "segnet", config.model.backbone, data.num_classes, classes=data.classes
        )
        finish(run.train_checkpoint, run.model, saved, run.train_log, record)
        run.mark_complete("train")

    on_main(save)
    barrier()  # model.pt written before any rank reads it
    return model
