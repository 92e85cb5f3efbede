"""Shared helpers of the benchmarks: configs, synthetic batches, interleaved timing, and the
training steps of the two training stages.

The steps are the stages' own (`aepsl.training.Trainer`, built by mine/train.py's
`classifier_trainer` and psl/stage.py's `segnet_trainer`), so a benchmark times the step a
real run takes; left out is what costs nothing next to a step: tqdm and TensorBoard logging.

Not a benchmark itself: the bench_*.py scripts import it (`python benchmarks/bench_x.py` puts
this folder on sys.path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aepsl.config import Config, load_config
from aepsl.mine import train as mine_train
from aepsl.models.segnet import build_segnet
from aepsl.psl import stage as psl_stage
from aepsl.runtime import prepare_model, seed_everything
from aepsl.training import Trainer

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
    """(N, 3, size, size) float32 images in [0, 1], like the datasets' output."""
    return torch.rand(n, 3, size, size, generator=generator)


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


def classifier_trainer(config: Config, num_classes: int, device: torch.device) -> Trainer:
    """A fresh classifier with the training step of `aepsl mine` (mine/train.py); call
    `.step([images, targets], iteration)`."""
    seed_everything(config.seed)
    model = prepare_model(mine_train.new_classifier(config, num_classes), config, device)
    return mine_train.classifier_trainer(model, config, device, steps=config.mine.epochs * 1000)


def segnet_trainer(config: Config, num_classes: int, device: torch.device) -> Trainer:
    """A fresh segmentation network with the training step of `aepsl train` (psl/stage.py);
    call `.step([images, pseudo_labels, targets], iteration)`."""
    seed_everything(config.seed)
    model = build_segnet(
        config.model.backbone, config.model.weights, num_classes, config.model.seg_output_stride
    )
    return psl_stage.segnet_trainer(prepare_model(model, config, device), config, device)


# ------------------------------------------------------------------ timing


def matmul_peak(
    sizes: list[int], reps: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[float, int]:
    """Best FLOP/s of `torch.mm` on square `dtype` matrices on `device`, and the size that
    reached it."""
    best, best_size = 0.0, sizes[0]
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: oneDNN / MKL / cuBLAS pick and cache their kernel
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best:
                best, best_size = rate, n
    return best, best_size


def synchronize(device: torch.device | str) -> None:
    """Wait for `device`'s queued work (CUDA runs asynchronously), so a clock reads it whole."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
