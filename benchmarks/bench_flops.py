"""Compute efficiency (issue 6, fig. 2): FLOP/s of a VGG16 training step in bf16 + channels_last
as a fraction of this machine's bf16 matmul FLOP/s, both measured in the same run.

- Peak: the best FLOP/s of square bf16 `torch.mm` over --mm-sizes, --mm-reps each (2 n^3 FLOPs).
- Models, weights none, --classes classes, random batches of --batch images at --size px:
    segnet      build_segnet(backbone) (VGG16: DeepLab-LargeFOV), the step of `aepsl train`
                (forward, PSL loss, backward, SGD; psl/stage.py `run_train`)
    classifier  build_classifier(backbone), the step of `aepsl mine` (forward, BCE, backward,
                SGD; mine/stage.py `_train_step`)
  Both steps come from benchmarks/_common.py, with precision=bf16 and channels_last=true.
- FLOPs per step: torch.utils.flop_counter.FlopCounterMode over forward + loss + backward
  (matmul and convolution FLOPs, 2 per multiply-add; the SGD update and elementwise ops are not
  counted), on one untimed step. Achieved FLOP/s = those FLOPs / median time of a whole step.

Usage: .venv/bin/python benchmarks/bench_flops.py [--model both|segnet|classifier]
           [--backbone vgg16] [--size 321] [--batch 4] [--iters 4] [--warmup 1]
           [--mm-sizes 2048 3072 4096] [--mm-reps 5] [--fp32-peak] [--threads N]
Smoke: .venv/bin/python benchmarks/bench_flops.py --backbone tiny --size 64 --iters 2
           --mm-sizes 512 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    VOC_CLASSES,
    classifier_trainer,
    describe_machine,
    make_config,
    matmul_peak,
    median,
    multi_hot,
    random_images,
    random_labels,
    random_pseudo_labels,
    segnet_trainer,
    set_threads,
    spread,
    time_interleaved,
)
from torch.utils.flop_counter import FlopCounterMode

from aepsl.runtime import select_device

TARGET = 0.5


def build_runs(args: argparse.Namespace) -> tuple[dict, dict]:
    """Per model: a zero-argument training step, and its FLOPs counted on one untimed step."""
    config = make_config(
        None,
        [
            "precision=bf16",
            "channels_last=true",
            f"seed={args.seed}",
            f"device={args.device}",
            f"model.backbone={args.backbone}",
            "model.weights=none",
        ],
    )
    device = select_device(config)
    generator = torch.Generator().manual_seed(args.seed)
    labels = random_labels(args.batch, args.classes, generator)
    images = random_images(args.batch, args.size, generator)
    targets = multi_hot(labels, args.classes)
    runs, flops = {}, {}
    names = ["classifier", "segnet"] if args.model == "both" else [args.model]
    for name in names:
        if name == "segnet":
            training = segnet_trainer(config, args.classes, device)
            batch = [images, random_pseudo_labels(labels, args.size, generator), targets]
        else:
            training = classifier_trainer(config, args.classes, device)
            batch = [images, targets]
        with FlopCounterMode(display=False) as counter:
            training.step(batch, 0)  # forward, backward and the (uncounted) elementwise SGD
        flops[name] = counter.get_total_flops()
        runs[name] = lambda t=training, b=batch: t.step(b, 0)
    return runs, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["both", "segnet", "classifier"])
    parser.add_argument("--backbone", default="vgg16", choices=["vgg16", "tiny", "resnet50"])
    parser.add_argument("--size", type=int, default=321, help="crop side (DeepLab: 321)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument("--classes", type=int, default=VOC_CLASSES)
    parser.add_argument("--mm-sizes", type=int, nargs="+", default=[2048, 3072, 4096])
    parser.add_argument("--mm-reps", type=int, default=5, help="timed torch.mm per size")
    parser.add_argument("--fp32-peak", action="store_true", help="also time fp32 torch.mm")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_args()
    counts = (args.size, args.batch, args.iters, args.mm_reps, *args.mm_sizes)
    if min(counts) < 1 or args.warmup < 0 or args.classes < 3:
        parser.error("sizes and counts must be positive, --warmup >= 0, --classes >= 3")
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    print(describe_machine())

    peak, peak_size = matmul_peak(args.mm_sizes, args.mm_reps, torch.bfloat16)
    runs, flops = build_runs(args)
    times = time_interleaved(runs, args.warmup, args.iters)
    # The peak once more after the models, so a change in machine load cannot flatter them.
    again, again_size = matmul_peak(args.mm_sizes, max(1, args.mm_reps // 2), torch.bfloat16)
    print(
        f"bf16 torch.mm peak: {max(peak, again) / 1e9:.1f} GFLOP/s "
        f"(before the models {peak / 1e9:.1f} at n = {peak_size}, "
        f"after {again / 1e9:.1f} at n = {again_size})"
    )
    peak = max(peak, again)
    if args.fp32_peak:
        fp32, fp32_size = matmul_peak(args.mm_sizes, args.mm_reps, torch.float32)
        print(
            f"fp32 torch.mm peak: {fp32 / 1e9:.1f} GFLOP/s (n = {fp32_size}); "
            f"bf16/fp32 {peak / fp32:.2f}x"
        )
    fractions = {}
    for name, t in times.items():
        achieved = flops[name] / median(t)
        fractions[name] = achieved / peak
        print(
            f"{name} ({args.backbone}, bf16, channels_last, {args.size} px, batch {args.batch}): "
            f"{flops[name] / 1e9 / args.batch:.1f} GFLOP/image per step, {spread(t)}, "
            f"{achieved / 1e9:.1f} GFLOP/s = {100 * fractions[name]:.1f}% of peak"
        )
    print(
        f"{args.backbone} bf16 training FLOP/s / bf16 matmul peak ({peak / 1e9:.0f} GFLOP/s): "
        + ", ".join(f"{name} {100 * f:.1f}%" for name, f in fractions.items())
        + f" (target >= {100 * TARGET:.0f}%)"
    )


if __name__ == "__main__":
    main()
