"""Stage-1 speed (issue 8): classifier training throughput in fp32 vs bf16, and batched CAMs.

(a) Training: images/s of the `aepsl mine` training step (forward, multi-label BCE, backward,
    SGD step; the loop of mine/stage.py `_train_step`, via benchmarks/_common.py) for
      fp32     precision=fp32, channels_last=false  (the baseline)
      fp32-cl  precision=fp32, channels_last=true   (layout alone)
      bf16-cl  precision=bf16, channels_last=true   (what precision=auto picks on bf16 CPUs)
    on random images of --size px, batches of --batch, one freshly built model per setting
    (same seed, weights none). Steps of the settings are interleaved round by round.
(b) CAMs: images/s of the package's `compute_cams` (every class of a batch of images from one
    forward pass, as `_extract_regions` calls it with mine.batch_size images) against the loop
    of CAM scripts in the field: for each image, for each of its labels, forward the single
    image, take that class's map, ReLU, upsample, max-normalise (aepsl.mine.cam's
    `normalise_cams`). Same model, bf16 autocast, channels_last, eval mode, no_grad; --cam-images
    images with 1-3 labels out of --classes; the two are interleaved round by round and their
    maps are compared (max abs difference) to show they compute the same thing.

Usage: .venv/bin/python benchmarks/bench_mine.py [--backbone vgg16|tiny|resnet50] [--size 224]
           [--batch 8] [--iters 4] [--warmup 1] [--cam-images 32] [--cam-batch 16]
           [--cam-rounds 3] [--part both|train|cams] [--threads N]
Smoke: .venv/bin/python benchmarks/bench_mine.py --backbone tiny --size 64 --iters 2 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    VOC_CLASSES,
    classifier_trainer,
    describe_machine,
    make_config,
    median,
    multi_hot,
    random_images,
    random_labels,
    set_threads,
    spread,
    time_interleaved,
)

from aepsl.mine.cam import normalise_cams
from aepsl.mine.extract import compute_cams
from aepsl.models.classifier import CamClassifier
from aepsl.runtime import autocast, select_device, to_device

TRAIN_TARGET = 2.5
CAM_TARGET = 3.0

SETTINGS = {
    "fp32": ["precision=fp32", "channels_last=false"],
    "fp32-cl": ["precision=fp32", "channels_last=true"],
    "bf16-cl": ["precision=bf16", "channels_last=true"],
}


def bench_training(args: argparse.Namespace) -> tuple[float, float]:
    """Prints images/s per setting; returns bf16-cl / fp32 and bf16-cl / fp32-cl."""
    generator = torch.Generator().manual_seed(args.seed)
    labels = random_labels(args.batch, args.classes, generator)
    images = random_images(args.batch, args.size, generator)
    targets = multi_hot(labels, args.classes)
    runs, losses = {}, {}
    for name, overrides in SETTINGS.items():
        config = make_config(None, [*overrides, *common_overrides(args)])
        training = classifier_trainer(config, args.classes, select_device(config))
        losses[name] = []
        runs[name] = lambda t=training, name=name: losses[name].append(
            t.step([images, targets], 0)["total"]
        )
    print(
        f"(a) training step, {args.backbone} at {args.size} px, batch {args.batch}, "
        f"{args.iters} timed steps after {args.warmup} warm-up (median):"
    )
    times = time_interleaved(runs, args.warmup, args.iters)
    rate = {name: args.batch / median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"  {name:8s} {rate[name]:8.2f} images/s  {spread(t)}  "
            f"loss {losses[name][0]:.4f} -> {losses[name][-1]:.4f}"
        )
    print(f"  fp32-cl / fp32: {rate['fp32-cl'] / rate['fp32']:.2f}x (layout alone)")
    print(f"  bf16-cl / fp32-cl: {rate['bf16-cl'] / rate['fp32-cl']:.2f}x (precision alone)")
    return rate["bf16-cl"] / rate["fp32"], rate["bf16-cl"] / rate["fp32-cl"]


@torch.no_grad()
def naive_cams(
    model: CamClassifier, images: torch.Tensor, labels: list[list[int]], config, device
) -> list[torch.Tensor]:
    """The field's loop: one forward pass per (image, label); returns each image's (K, H, W)."""
    size = images.shape[-2:]
    out = []
    for image, keys in zip(images, labels, strict=True):
        maps = []
        for k in keys:
            batch = to_device(image[None], config, device)
            with autocast(config, device):
                raw = model.class_maps(batch)
            maps.append(normalise_cams(raw[:, k - 1 : k], size)[0, 0].cpu())
        out.append(torch.stack(maps))
    return out


def batched_cams(
    model: CamClassifier, images: torch.Tensor, labels: list[list[int]], config, device, batch
) -> list[torch.Tensor]:
    """The package's path: compute_cams on stacks of `batch` images, then each image's classes
    (as _extract_regions selects them)."""
    out = []
    for start in range(0, len(images), batch):
        cams = compute_cams(model, images[start : start + batch], config, device)
        for cam, keys in zip(cams, labels[start : start + batch], strict=True):
            out.append(cam[[k - 1 for k in keys]])
    return out


def bench_cams(args: argparse.Namespace) -> float:
    """Prints images/s of both; returns batched / naive."""
    config = make_config(None, ["precision=bf16", "channels_last=true", *common_overrides(args)])
    device = select_device(config)
    model = classifier_trainer(config, args.classes, device).net.eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    labels = random_labels(args.cam_images, args.classes, generator)
    images = random_images(args.cam_images, args.size, generator)
    n = args.cam_images
    # Warm-up on the shapes the timed rounds use (a full and a last partial batch, batch 1).
    parts = [slice(0, min(n, args.cam_batch))]
    if n > args.cam_batch and n % args.cam_batch:
        parts.append(slice(n - n % args.cam_batch, n))
    for part in parts:
        batched_cams(model, images[part], labels[part], config, device, args.cam_batch)
    naive_cams(model, images[:1], labels[:1], config, device)
    results = {}
    runs = {
        "batched": lambda: results.__setitem__(
            "batched", batched_cams(model, images, labels, config, device, args.cam_batch)
        ),
        "naive": lambda: results.__setitem__(
            "naive", naive_cams(model, images, labels, config, device)
        ),
    }
    times = time_interleaved(runs, 0, args.cam_rounds)
    passes = sum(len(k) for k in labels)
    print(
        f"(b) CAM extraction, {args.backbone} bf16 channels_last at {args.size} px, {n} images "
        f"with {passes} labels ({args.cam_rounds} rounds, median):"
    )
    rate = {name: n / median(t) for name, t in times.items()}
    print(
        f"  batched  {rate['batched']:8.2f} images/s  {spread(times['batched'])}  "
        f"compute_cams, {-(-n // args.cam_batch)} forward passes of <= {args.cam_batch} images"
    )
    print(
        f"  naive    {rate['naive']:8.2f} images/s  {spread(times['naive'])}  "
        f"{passes} forward passes of 1 image"
    )
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(results["batched"], results["naive"], strict=True)
    )
    print(f"  max |batched - naive| over the images' CAMs: {diff:.4f} (bf16 rounding only)")
    return rate["batched"] / rate["naive"]


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"seed={args.seed}",
        f"device={args.device}",
        f"model.backbone={args.backbone}",
        "model.weights=none",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16", choices=["vgg16", "tiny", "resnet50"])
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="(a) training batch size")
    parser.add_argument("--iters", type=int, default=4, help="(a) timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="(a) untimed steps per setting")
    parser.add_argument("--cam-images", type=int, default=32, help="(b) images per round")
    parser.add_argument("--cam-batch", type=int, default=16, help="(b) compute_cams batch")
    parser.add_argument("--cam-rounds", type=int, default=3, help="(b) timed rounds")
    parser.add_argument("--classes", type=int, default=VOC_CLASSES)
    parser.add_argument("--part", default="both", choices=["both", "train", "cams"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_args()
    positive = ("size", "batch", "iters", "cam_images", "cam_batch", "cam_rounds", "classes")
    if any(getattr(args, name) < 1 for name in positive) or args.warmup < 0:
        parser.error("sizes, counts and iterations must be positive (--warmup >= 0)")
    if args.classes < 3:
        parser.error("--classes must be >= 3 (images get 1-3 labels)")
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    print(describe_machine())
    headline = []
    if args.part in ("both", "train"):
        ratio, same_layout = bench_training(args)
        headline.append(
            f"bf16/fp32 training throughput: {ratio:.2f}x (target >= {TRAIN_TARGET}x; "
            f"vs fp32 channels_last {same_layout:.2f}x)"
        )
    if args.part in ("both", "cams"):
        ratio = bench_cams(args)
        headline.append(f"batched/naive CAM throughput: {ratio:.2f}x (target >= {CAM_TARGET}x)")
    print(f"{args.backbone}: " + "; ".join(headline))


if __name__ == "__main__":
    main()
