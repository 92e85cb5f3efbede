"""Data pipeline vs model (issue 6, fig. 4): images/s of the real training DataLoaders against
images/s of the training step that consumes them, at the same batch size.

Data: `aepsl synth` images (make_synth, --n images of --size px) in a temporary folder, read
through the config exactly as the stages read it (load_dataset, the train split), with
--workers DataLoader workers (data.num_workers):
  mine   ErasedImages(train, C, previous, mean fill, crop=data.image_size) in the loader of
         the training loop (aepsl.training.epoch_loader with mine/stage.py's plan: a new
         loader every epoch, as there). `previous` holds --erase-steps region folders (the
         synth masks copied in), so every image is erased as at step --erase-steps + 1.
  psl    PseudoLabelled(train, C, labels, train.crop_size, train.scale_range, seed) in the
         same loader with psl/stage.py's plan (a new loader every epoch); the pseudo labels
         are the synth masks copied into a labels folder.
  Each loader runs --epochs timed epochs after one untimed epoch (page cache, imports). The
  headline counts whole epochs, worker start-up included, since the stages pay it every epoch;
  the rate after each epoch's first batch is printed beside it.
Model: the training step that consumes each loader (the stages' own `Trainer.step`, built by
  benchmarks/_common.py), timed on the loader's first real batch: the classifier for
  mine, the segmentation network for psl, at mine.batch_size and train.batch_size.

Settings: built-in defaults (the paper's: VGG16, data.image_size 256, crop 321, batches 16 and
20, bf16) unless --config names a preset; `key=value` overrides as on the command line. The
demo's setting (tiny network, 128 px): --config src/aepsl/configs/demo_tiny.yaml --size 128.

Usage: .venv/bin/python benchmarks/bench_data.py [--config YAML] [key=value ...] [--n 240]
           [--size 256] [--workers 2] [--epochs 2] [--iters 2] [--warmup 1] [--threads N]
Smoke: .venv/bin/python benchmarks/bench_data.py --config src/aepsl/configs/demo_tiny.yaml
           --n 24 --size 64 data.image_size=64 train.crop_size=56 --epochs 1 --iters 1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from _common import (
    classifier_trainer,
    describe_machine,
    make_config,
    median,
    segnet_trainer,
    set_threads,
    spread,
    time_interleaved,
)

from aepsl.config import Config
from aepsl.data.datasets import load_dataset
from aepsl.data.synth import make_synth
from aepsl.layout import RunLayout
from aepsl.mine.data import ErasedImages, mean_pixel
from aepsl.mine.train import classifier_plan, step_epochs
from aepsl.psl.data import PseudoLabelled
from aepsl.psl.stage import segnet_plan
from aepsl.runtime import select_device
from aepsl.training import epoch_loader

TARGET = 3.0


def mine_loaders(config: Config, root: Path, work: Path, erase_steps: int, device):
    """(dataset, epoch -> DataLoader) as mine/stage.py `_train_step` builds them."""
    data = load_dataset(config.data)
    train = data.split(config.data.train_split)
    run = RunLayout(work, config)
    previous = []
    for step in range(1, erase_steps + 1):
        shutil.copytree(root / "masks", run.step(step).regions)
        previous.append(run.step(step).regions)
    step = run.step(erase_steps + 1)
    dataset = ErasedImages(
        train, data.num_classes, previous, mean_pixel(train), crop=config.data.image_size
    )
    plan = classifier_plan(config, step, run, len(dataset), step_epochs(config.mine, train))
    return dataset, lambda epoch: epoch_loader(dataset, plan, epoch, 0, config, device)


def psl_loaders(config: Config, root: Path, work: Path, device):
    """(dataset, epoch -> DataLoader) as psl/stage.py `run_train` builds them."""
    data = load_dataset(config.data)
    train = data.split(config.data.train_split)
    run = RunLayout(work, config)
    shutil.copytree(root / "masks", run.labels)
    cfg = config.train
    dataset = PseudoLabelled(
        train, data.num_classes, run.labels, cfg.crop_size, cfg.scale_range, config.seed
    )
    plan = segnet_plan(config, run)
    return dataset, lambda epoch: epoch_loader(dataset, plan, epoch, 0, config, device)


def time_epochs(make_loader: Callable[[int], Iterable], epochs: int) -> dict[str, float]:
    """Images/s over whole epochs (loader creation and worker start-up included), and after
    each epoch's first batch; epoch 0 is untimed."""
    images = seconds = steady_images = steady_seconds = first = 0.0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        count = 0
        first_at = None
        first_count = 0
        for batch in make_loader(epoch):
            count += len(batch[0])
            if first_at is None:
                first_at, first_count = time.perf_counter(), count
        end = time.perf_counter()
        if epoch == 0:
            continue
        images += count
        seconds += end - start
        steady_images += count - first_count
        steady_seconds += end - first_at
        first += first_at - start
    return {
        "rate": images / seconds,
        "steady": steady_images / steady_seconds if steady_images else float("nan"),
        "first_batch": first / epochs,
        "epoch": seconds / epochs,
        "images": images / epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="preset YAML (default: the built-in paper settings)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--n", type=int, default=240, help="synth images (train: 3/4)")
    parser.add_argument("--size", type=int, default=256, help="synth image side in px")
    parser.add_argument("--workers", type=int, default=2, help="data.num_workers")
    parser.add_argument("--erase-steps", type=int, default=2, help="region folders erased")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader")
    parser.add_argument("--iters", type=int, default=2, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_intermixed_args()
    if min(args.n, args.epochs, args.iters) < 1 or min(args.workers, args.warmup) < 0:
        parser.error("--n, --epochs, --iters must be positive; --workers, --warmup >= 0")
    set_threads(args.threads)
    torch.manual_seed(0)
    print(describe_machine())

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        root = make_synth(work / "synth", n=args.n, size=args.size, seed=0)
        print(f"synth: {args.n} images of {args.size} px in {time.perf_counter() - start:.1f} s")
        config = make_config(
            args.config,
            [
                "model.weights=none",  # no downloads; weights do not change the speed
                *args.overrides,
                f"data.root={root}",
                f"data.num_workers={args.workers}",
            ],
        )
        device = select_device(config)
        backbone = config.model.backbone
        print(
            f"settings: {args.config or 'built-in defaults'}; {backbone}, {config.precision}, "
            f"channels_last {config.channels_last}, {args.workers} workers"
        )
        mine_set, mine_loader = mine_loaders(config, root, work, args.erase_steps, device)
        psl_set, psl_loader = psl_loaders(config, root, work, device)
        data_rates = {
            "mine": time_epochs(mine_loader, args.epochs),
            "psl": time_epochs(psl_loader, args.epochs),
        }
        mine_batch = next(iter(mine_loader(0)))
        psl_batch = next(iter(psl_loader(0)))

    num_classes = len(mine_batch[1][0])
    classifier = classifier_trainer(config, num_classes, device)
    segnet = segnet_trainer(config, num_classes, device)
    runs = {
        "mine": lambda: classifier.step(list(mine_batch), 0),
        "psl": lambda: segnet.step(list(psl_batch), 0),
    }
    times = time_interleaved(runs, args.warmup, args.iters)
    batches = {"mine": len(mine_batch[0]), "psl": len(psl_batch[0])}
    shapes = {
        "mine": f"ErasedImages, {len(mine_set)} images, crop {config.data.image_size}",
        "psl": f"PseudoLabelled, {len(psl_set)} images, crop {config.train.crop_size}",
    }
    models = {"mine": f"classifier {backbone}", "psl": f"segnet {backbone}"}
    ratios = {}
    for name in ("mine", "psl"):
        rate = data_rates[name]
        model_rate = batches[name] / median(times[name])
        ratios[name] = rate["rate"] / model_rate
        print(
            f"{name}: data {rate['rate']:.1f} images/s ({shapes[name]}, batch {batches[name]}; "
            f"{rate['epoch']:.2f} s/epoch, first batch after {rate['first_batch']:.2f} s, "
            f"{rate['steady']:.1f} images/s after it)"
        )
        print(
            f"{name}: model {model_rate:.1f} images/s ({models[name]} training step, "
            f"{spread(times[name])}); data/model {ratios[name]:.2f}x"
        )
    print(
        f"data pipeline / {backbone} training step images/s ({args.workers} workers): "
        f"mine {ratios['mine']:.2f}x, psl {ratios['psl']:.2f}x (target >= {TARGET}x)"
    )


if __name__ == "__main__":
    main()
