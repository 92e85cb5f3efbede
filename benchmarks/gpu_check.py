"""The GPU check (issue 29): what a user's first GPU run exercises, measured in one command.

    python benchmarks/gpu_check.py --out gpu_check       # on a machine with CUDA (minutes)
    python benchmarks/gpu_check.py --dry --out /tmp/gc   # on the CPU, tiny sizes (the tests)

Sections, each timed and recorded even when another fails (its error is the record):
- machine: torch, CUDA, the GPU, the usable CPUs;
- peak: the best bf16 `torch.mm` rate measured here (the denominator of the fractions below);
- training: images/s of the CAM classifier's and of DeepLab-LargeFOV's training step (VGG16,
  321 px crops, bf16, the VOC preset's networks), their FLOPs per image counted by torch, the
  fraction of the measured peak, and the peak GPU memory;
- crf: the torch dense CRF on the device against the CPU (labels equal) and its images/s at
  500 x 375 with 21 classes;
- loader: images/s of mining's data loader (JPEG decode, erasing, random crop) on 500 x 375
  JPEGs with as many workers as usable CPUs;
- run: `aepsl run` of the VOC preset's networks (VGG16, LargeFOV head, bf16) on a generated
  data set, start to finish;
- torchrun: `torchrun --nproc_per_node N -m aepsl mine` (NCCL on CUDA, gloo on the CPU);
- tests: the test files with CUDA cases (test_crf_torch, test_distributed).

Writes OUT/gpu_check.json and OUT/gpu_check.md. --dry: device cpu, fp32, the tiny network and
sizes, so the script runs in seconds in the test suite and cannot rot. It needs only what
`pip install -e .` installs (and pytest for the tests section).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    classifier_trainer,
    make_config,
    matmul_peak,
    multi_hot,
    random_images,
    random_labels,
    random_pseudo_labels,
    segnet_trainer,
    synchronize,
)
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from aepsl.runtime import usable_cpus

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "device": "cuda",
    "precision": "bf16",
    "backbone": "vgg16",
    "crop": 321,
    "batch": 20,
    "steps": 10,
    "classes": 21,
    "crf_size": (375, 500),
    "crf_images": 16,
    "loader_images": 256,
    "mm_sizes": [4096, 8192],
    "run_images": 64,
}
DRY = {
    "device": "cpu",
    "precision": "fp32",
    "backbone": "tiny",
    "crop": 48,
    "batch": 2,
    "steps": 2,
    "classes": 3,
    "crf_size": (48, 64),
    "crf_images": 2,
    "loader_images": 8,
    "mm_sizes": [256],
    "run_images": 12,
}


def machine(_: dict[str, Any], __: Path) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "usable_cpus": usable_cpus(),
    }


def peak(size: dict[str, Any], _: Path) -> dict[str, Any]:
    dtype = torch.bfloat16 if size["precision"] == "bf16" else torch.float32
    rate, n = matmul_peak(size["mm_sizes"], 5, dtype, size["device"])
    return {"tflops": round(rate / 1e12, 3), "matrix": n, "dtype": str(dtype)}


def training(size: dict[str, Any], _: Path, peak_tflops: float | None = None) -> dict[str, Any]:
    overrides = [
        f"device={size['device']}",
        f"precision={size['precision']}",
        f"model.backbone={size['backbone']}",
        "model.weights=none",
        "model.cam_head=largefov",
    ]
    config = make_config(None, overrides)
    device = torch.device(size["device"])
    generator = torch.Generator().manual_seed(0)
    labels = random_labels(size["batch"], size["classes"] - 1, generator)
    images = random_images(size["batch"], size["crop"], generator)
    targets = multi_hot(labels, size["classes"] - 1)
    result = {}
    for name in ("classifier", "segnet"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if name == "classifier":
            trainer, batch = (
                classifier_trainer(config, size["classes"] - 1, device),
                [images, targets],
            )
        else:
            pseudo = random_pseudo_labels(labels, size["crop"], generator)
            trainer = segnet_trainer(config, size["classes"] - 1, device)
            batch = [images, pseudo, targets]
        with FlopCounterMode(display=False) as counter:
            trainer.step(batch, 0)  # also the warm-up (cuDNN picks its kernels)
        synchronize(device)
        start = time.perf_counter()
        for step in range(size["steps"]):
            trainer.step(batch, step + 1)
        synchronize(device)
        seconds = time.perf_counter() - start
        per_image = counter.get_total_flops() / size["batch"]
        rate = size["batch"] * size["steps"] / seconds
        result[name] = {
            "images_per_s": round(rate, 2),
            "gflop_per_image": round(per_image / 1e9, 2),
            "fraction_of_peak": round(rate * per_image / (peak_tflops * 1e12), 3)
            if peak_tflops
            else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if device.type == "cuda"
            else None,
        }
    return result


def crf(size: dict[str, Any], _: Path) -> dict[str, Any]:
    from aepsl.inference.crf import crf_labels_torch
    from aepsl.inference.crf_params import CrfParams

    rng = np.random.default_rng(0)
    height, width = size["crf_size"]
    images = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8)] * size["crf_images"]
    logits = rng.normal(size=(size["classes"], height, width)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    probs_list = [probs] * size["crf_images"]
    params = CrfParams.defaults()
    device = size["device"]
    crf_labels_torch(images[:1], probs_list[:1], device, params=params)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    labels = crf_labels_torch(images, probs_list, device, params=params)
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu = crf_labels_torch(images[:1], probs_list[:1], "cpu", params=params)[0]
    return {
        "images_per_s": round(len(images) / seconds, 2),
        "image": f"{width}x{height}, {size['classes']} classes",
        "labels_equal_to_cpu": round(float((labels[0] == cpu).mean()), 6),
    }


def loader(size: dict[str, Any], work: Path) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from aepsl.data.types import Sample
    from aepsl.mine.data import ErasedImages

    folder = work / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    height, width = size["crf_size"]
    samples = []
    for k in range(size["loader_images"]):
        path = folder / f"{k}.jpg"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(k), path, (1,)))
    workers = 0 if size["device"] == "cpu" else usable_cpus()
    dataset = ErasedImages(samples, size["classes"] - 1, [], [124, 116, 104], crop=size["crop"])
    batches = DataLoader(dataset, batch_size=size["batch"], num_workers=workers)
    start = time.perf_counter()
    count = sum(len(batch[0]) for batch in batches)
    seconds = time.perf_counter() - start
    return {"images_per_s": round(count / seconds, 1), "workers": workers}


def _aepsl(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    record = {"exit": result.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if result.returncode:
        record["error"] = lines[-1] if lines else "no message"
    return record


def _run_overrides(size: dict[str, Any], data: Path) -> list[str]:
    dry = size["device"] == "cpu"
    return [
        f"data.root={data}",
        "data.train_split=train",  # the preset's train_aug: a VOC folder's split
        "saliency.source=builtin",  # the preset's DRFI maps: not in generated data
        f"data.num_workers={0 if dry else 'auto'}",
        f"device={size['device']}",
        f"precision={size['precision']}",
        f"model.backbone={size['backbone']}",
        "model.weights=none",
        "model.cam_head=largefov",
        f"data.image_size={size['crop']}",
        f"train.crop_size={size['crop']}",
        f"mine.batch_size={size['batch'] if not dry else 4}",
        f"train.batch_size={size['batch'] if not dry else 4}",
        "mine.epochs=1",
        f"train.iterations={2 if dry else 50}",
        "crf.backend=torch",
    ]


def run(size: dict[str, Any], work: Path) -> dict[str, Any]:
    data = work / "data"
    if not data.is_dir():
        subprocess.run(
            [sys.executable, "-m", "aepsl", "synth", str(data), "--n", str(size["run_images"])],
            check=True,
            capture_output=True,
        )
    argv = [sys.executable, "-m", "aepsl", "run", "voc_vgg16", "data.format=folder"]
    return _aepsl([*argv, *_run_overrides(size, data), "--out", str(work / "run")])


def torchrun(size: dict[str, Any], work: Path) -> dict[str, Any]:
    processes = max(1, torch.cuda.device_count()) if size["device"] == "cuda" else 2
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    argv += ["-m", "aepsl", "mine", "voc_vgg16", "data.format=folder"]
    overrides = [o for o in _run_overrides(size, work / "data") if not o.startswith("train.")]
    record = _aepsl([*argv, *overrides, "mine.steps=1", "--out", str(work / "ddp")])
    return {"processes": processes, **record}


def tests(size: dict[str, Any], _: Path) -> dict[str, Any]:
    files = ["tests/test_crf_torch.py", "tests/test_distributed.py"]
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if size["device"] == "cpu":
        argv += ["-k", "cuda"]  # the CUDA cases only: skipped on a machine without one
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return {"exit": result.returncode, "summary": summary}


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "machine": machine,
    "peak": peak,
    "training": training,
    "crf": crf,
    "loader": loader,
    "run": run,
    "torchrun": torchrun,
    "tests": tests,
}


def check(size: dict[str, Any], work: Path, only: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name in only:
        start = time.perf_counter()
        try:
            if name == "training":
                tflops = report.get("peak", {}).get("tflops")
                report[name] = training(size, work, tflops)
            else:
                report[name] = SECTIONS[name](size, work)
        except Exception as exc:  # recorded: the other sections still run
            lines = traceback.format_exception_only(type(exc), exc)
            report[name] = {"error": " ".join(line.strip() for line in lines)}
        report[name]["section_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    return report


def markdown(report: dict[str, Any], dry: bool) -> str:
    lines = [f"# GPU check{' (dry run on the CPU)' if dry else ''}", ""]
    lines += ["| section | result |", "|---|---|"]
    for name, record in report.items():
        text = ", ".join(f"{k}: {v}" for k, v in record.items())
        lines.append(f"| {name} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and .md")
    parser.add_argument("--dry", action="store_true", help="on the CPU, tiny sizes")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry on the CPU")
    size = DRY if args.dry else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = check(size, Path(tmp), args.only)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report, args.dry))
    failed = [name for name, record in report.items() if "error" in record]
    print(f"wrote {out / 'gpu_check.json'}; sections failed: {', '.join(failed) or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
