"""The one training loop of the stages that train: mine's classifiers and PSL's network.

A stage supplies the model, its loss, its dataset and its schedule (a `Plan`); `fit` does the
rest the same way for both: resume from the last checkpoint, mixed precision and loss scaling,
data parallelism (DDP), a seeded permutation per epoch sharded over the ranks, checks for
non-finite losses and weights, progress bar, TensorBoard, checkpoints.

Reproducibility: epoch e draws its permutation, its crops (the dataset's `set_epoch`) and its
dropout from seeds that depend on (plan, e) alone, so a run resumed at a checkpoint continues as
the uninterrupted run would, and N data-parallel processes see the batches of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from aepsl.config import Config
from aepsl.io import load_checkpoint, save_checkpoint, write_json
from aepsl.runtime import (
    autocast,
    data_parallel,
    grad_scaler,
    is_main,
    loader_workers,
    on_main,
    rank,
    seed_rank,
    shard_batches,
    summary_writer,
    to_device,
    world_size,
)

# (model outputs, the batch's other tensors, iteration) -> (this rank's loss to back-propagate,
# the global batch's loss parts for logging, "total" among them)
LossFn = Callable[[Any, list[torch.Tensor], int], tuple[torch.Tensor, dict[str, float]]]


class EpochDataset(Protocol):
    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


class EpochSampler(Sampler[int]):
    """A seeded permutation of `size` items started at `offset` (resuming mid-epoch replays the
    rest of the epoch). With `world_size` > 1 processes, each yields its rank's share of every
    complete global batch of `batch_size` items (runtime.shard_batches); `offset` counts global
    items and must then be a multiple of `batch_size`."""

    def __init__(
        self,
        size: int,
        seed: int,
        offset: int = 0,
        *,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size, self.seed, self.offset = size, seed, offset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.size, generator=generator)[self.offset :].tolist()
        yield from shard_batches(order, self.batch_size, self.rank, self.world_size)

    def __len__(self) -> int:
        rest = self.size - self.offset
        if self.world_size == 1:
            return rest
        return rest // self.batch_size * (self.batch_size // self.world_size)


def sgd(
    model: nn.Module, base_lr: float, new_lr: float, momentum: float, weight_decay: float
) -> torch.optim.SGD:
    """SGD with the model's `new_parameters()` at `new_lr` and every other parameter (the
    pretrained ones) at `base_lr`."""
    new = {id(p) for p in model.new_parameters()}
    return torch.optim.SGD(
        [
            {"params": [p for p in model.parameters() if id(p) not in new], "lr": base_lr},
            {"params": model.new_parameters(), "lr": new_lr},
        ],
        lr=base_lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def poly(iteration: int, total: int, power: float = 0.9) -> float:
    """DeepLab's poly learning-rate factor (1 - it / total) ** power."""
    return (1 - min(iteration, total - 1) / total) ** power


@dataclass
class Plan:
    """What a stage trains for and where: the loop's settings."""

    name: str  # "step 2", "train": progress bar, messages and TensorBoard tags
    iterations: int
    batch_size: int  # the global batch, over all ranks
    epoch_seed: Callable[[int], int]  # the permutation's and dropout's seed of an epoch
    checkpoint: Path
    checkpoint_every: int  # iterations
    tensorboard: Path


@dataclass
class FitResult:
    iterations: int
    last: dict[str, float] = field(default_factory=dict)  # the last step's loss parts
    epoch_mean: float = math.nan  # mean total loss over the last epoch's steps


class Trainer:
    """One SGD step of a stage: forward under autocast, loss, scaled backward, optimiser and
    learning-rate step. Benchmarks time exactly this."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_factor: Callable[[int], float],
        loss_fn: LossFn,
        config: Config,
        device: torch.device,
    ) -> None:
        self.net = model  # the module itself; `model` may be its DDP wrapper
        self.model = data_parallel(model, device)
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.scaler = grad_scaler(config, device)
        self.loss_fn = loss_fn
        self.config, self.device = config, device

    def step(self, batch: list[torch.Tensor], iteration: int) -> dict[str, float]:
        """Train on one batch (images first); returns the loss parts (not finite: no step)."""
        images, *rest = batch
        images = to_device(images, self.config, self.device)
        rest = [tensor.to(self.device) for tensor in rest]
        with autocast(self.config, self.device):
            outputs = self.model(images)
        loss, parts = self.loss_fn(outputs, rest, iteration)
        if not math.isfinite(parts["total"]):
            return parts
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return parts

    def weights_finite(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.net.parameters())

    def state_dict(self, iteration: int) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": iteration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint; returns its iteration."""
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["iteration"])


def epoch_loader(
    dataset: EpochDataset,
    plan: Plan,
    epoch: int,
    skip_batches: int,
    config: Config,
    device: torch.device,
) -> DataLoader:
    """This rank's batches of `epoch` after the first `skip_batches` (a resumed epoch)."""
    world = world_size()
    dataset.set_epoch(epoch)
    sampler = EpochSampler(
        len(dataset),
        plan.epoch_seed(epoch),
        skip_batches * plan.batch_size,
        batch_size=plan.batch_size,
        rank=rank(),
        world_size=world,
    )
    return DataLoader(
        dataset,
        batch_size=plan.batch_size // world,
        sampler=sampler,
        drop_last=len(dataset) >= plan.batch_size,
        num_workers=loader_workers(config),
        pin_memory=device.type == "cuda",
    )


def batches_per_epoch(images: int, batch_size: int) -> int:
    """Batches an epoch of `images` makes: the incomplete last one is dropped, unless it is the
    only one (fewer images than a batch)."""
    return max(1, images // batch_size)


def fit(trainer: Trainer, dataset: EpochDataset, plan: Plan) -> FitResult:
    """Train `plan.iterations` steps on `dataset` (resuming from `plan.checkpoint`)."""
    config, device = trainer.config, trainer.device
    iteration = 0
    if on_main(plan.checkpoint.is_file):
        iteration = trainer.load_state_dict(load_checkpoint(plan.checkpoint))
        print(f"{plan.name}: resuming at iteration {iteration}/{plan.iterations}")
    per_epoch = batches_per_epoch(len(dataset), plan.batch_size)
    writer = summary_writer(str(plan.tensorboard))
    bar = tqdm(
        total=plan.iterations,
        initial=iteration,
        desc=plan.name,
        unit="it",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    result = FitResult(iteration)
    trainer.model.train()
    try:
        while iteration < plan.iterations:
            epoch, done_in_epoch = divmod(iteration, per_epoch)
            seed_rank(plan.epoch_seed(epoch))  # dropout; crops are seeded per sample
            totals = []
            for batch in epoch_loader(dataset, plan, epoch, done_in_epoch, config, device):
                parts = trainer.step(batch, iteration)
                if not math.isfinite(parts["total"]):
                    raise FloatingPointError(
                        f"{plan.name}: loss is {parts['total']} at iteration {iteration + 1}"
                        f"{_last_good(plan.checkpoint)}"
                    )
                iteration += 1
                result.last = parts
                totals.append(parts["total"])
                for key, value in parts.items():
                    writer.add_scalar(f"{plan.name.replace(' ', '')}/{key}", value, iteration)
                bar.update()
                bar.set_postfix(loss=f"{parts['total']:.4f}")
                due = iteration % plan.checkpoint_every == 0 or iteration == plan.iterations
                if due and not trainer.weights_finite():
                    raise FloatingPointError(
                        f"{plan.name}: weights are not finite after iteration {iteration}"
                        f"{_last_good(plan.checkpoint)}"
                    )
                if due and iteration < plan.iterations and is_main():
                    save_checkpoint(plan.checkpoint, trainer.state_dict(iteration))
                if iteration >= plan.iterations:
                    break
            result.epoch_mean = sum(totals) / len(totals) if totals else math.nan
    finally:
        bar.close()  # before any error line, so it starts a line of its own
        writer.close()
    result.iterations = iteration
    return result


def _last_good(checkpoint: Path) -> str:
    if checkpoint.is_file():
        return f"; the last good checkpoint is {checkpoint}"
    return "; no checkpoint was written before it"


def finish(
    checkpoint: Path, final: Path, model_record: dict[str, Any], log: Path, record: dict
) -> None:
    """Write the training log, then the trained model, then drop the resumable checkpoint:
    a model file on disk means its log is there too."""
    write_json(log, record)
    save_checkpoint(final, model_record)
    checkpoint.unlink(missing_ok=True)
