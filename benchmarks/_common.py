"""Shared helpers of the benchmarks: configs, synthetic batches, interleaved timing, and the
training steps of the two training stages.

The steps mirror the loops of the stages statement for statement (`_train_step` in
src/aepsl/mine/stage.py, `run_train` in src/aepsl/psl/stage.py) and call the package's own
builders, runtime helpers and loss, so a benchmark times the code path a real run takes. Left
out, because they cost nothing next to a step: the LR scheduler, tqdm and TensorBoard logging.
If a stage's loop changes, change its mirror here.

Not a benchmark itself: the bench_*.py scripts import it (`python benchmarks/bench_x.py` puts
this folder on sys.path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from aepsl.config import Config, load_config
from aepsl.mine.stage import build_optimizer as build_classifier_optimizer
from aepsl.models.classifier import CamClassifier, build_classifier
from aepsl.models.segnet import SegNet, build_segnet
from aepsl.psl.loss import psl_loss
from aepsl.psl.stage import build_optimizer
from aepsl.runtime import autocast, grad_scaler, prepare_model, seed_everything, to_device

VOC_CLASSES = 20


def make_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """A validated config, exactly as the command line builds one (preset + key=value)."""
    return load_config(path, list(overrides))


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (None: torch's default, one per core). On a machine whose cores
    are busy with other work, 1 avoids OpenMP threads waiting on each other."""
    if threads is not None:
        torch.set_num_threads(threads)


def describe_machine() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {capability}"


# ------------------------------------------------------------------ synthetic batches


def random_labels(
    n: int, num_classes: int, generator: torch.Generator, low: int = 1, high: int = 3
) -> list[list[int]]:
    """`n` label sets of `low`..`high` distinct classes each, as class ids 1..C."""
    sets = []
    for _ in range(n):
        count = int(torch.randint(low, high + 1, (1,), generator=generator))
        sets.append(sorted((torch.randperm(num_classes, generator=generator)[:count] + 1).tolist()))
    return sets


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """(N, C) float targets as the datasets build them (class k -> column k - 1)."""
    targets = torch.zeros(len(labels), num_classes)
    for row, keys in enumerate(labels):
        targets[row, [k - 1 for k in keys]] = 1.0
    return targets


def random_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, size, size) float32 images, already normalised like the datasets' output."""
    return torch.randn(n, 3, size, size, generator=generator)


def random_pseudo_labels(
    labels: list[list[int]], size: int, generator: torch.Generator
) -> torch.Tensor:
    """(N, size, size) int64 pseudo labels: background, the image's classes, and 255."""
    maps = []
    for keys in labels:
        choices = torch.tensor([0, *keys, 255])
        maps.append(choices[torch.randint(len(choices), (size, size), generator=generator)])
    return torch.stack(maps)


# ------------------------------------------------------------------ training steps


class ClassifierTraining:
    """One training step of `aepsl mine` (mine/stage.py `_train_step`, inner loop)."""

    def __init__(self, config: Config, num_classes: int, device: torch.device) -> None:
        self.config, self.device = config, device
        seed_everything(config.seed)
        model = build_classifier(config.model.backbone, config.model.weights, num_classes)
        self.model: CamClassifier = prepare_model(model, config, device)
        self.optimizer = build_classifier_optimizer(self.model, config)
        self.scaler = grad_scaler(config, device)
        self.model.train()

    def loss_and_backward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        config, device = self.config, self.device
        images, targets = to_device(images, config, device), targets.to(device)
        with autocast(config, device):
            logits = self.model(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        loss = self.loss_and_backward(images, targets)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()


class SegnetTraining:
    """One training step of `aepsl train` (psl/stage.py `run_train`, inner loop)."""

    def __init__(self, config: Config, num_classes: int, device: torch.device) -> None:
        self.config, self.device = config, device
        seed_everything(config.seed)
        model = build_segnet(
            config.model.backbone, config.model.weights, num_classes, config.model.seg_output_stride
        )
        self.model: SegNet = prepare_model(model, config, device)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = grad_scaler(config, device)
        self.model.train()

    def loss_and_backward(
        self, images: torch.Tensor, pseudo: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        config, device = self.config, self.device
        images = to_device(images, config, device)
        pseudo, targets = pseudo.to(device), targets.to(device)
        with autocast(config, device):
            scores, class_logits = self.model(images)
        loss, _ = psl_loss(scores.float(), class_logits.float(), pseudo, targets, config.train.psl)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss

    def step(self, images: torch.Tensor, pseudo: torch.Tensor, targets: torch.Tensor) -> float:
        loss = self.loss_and_backward(images, pseudo, targets)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()


# ------------------------------------------------------------------ timing


def time_interleaved(
    runs: dict[str, Callable[[], Any]], warmup: int, iters: int
) -> dict[str, list[float]]:
    """Seconds per call of each run: `warmup` untimed calls each, then `iters` rounds that
    call every run once in turn, so a change in machine load hits all runs alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """'median s (min-max)' of a list of durations, for the detail lines."""
    return f"{median(values):.3f} s/iter ({min(values):.3f}-{max(values):.3f})"
