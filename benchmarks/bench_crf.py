"""Dense CRF speed and agreement (issue 18): pydensecrf against the torch backend, side by side.

Data: photographs bundled with scikit-image (astronaut, chelsea, coffee, rocket, and their
mirror images), resized to VOC size (--width x --height, default 500x375), with realistic
unaries for --classes classes (default 21): a "ground truth" of Felzenszwalb segments given
random classes (the largest segment is background), one-hot x 4 plus Gaussian noise, blurred
(sigma 4 px, so errors come in blobs and boundaries are soft), softmax. The CRF parameters are
aepsl's defaults (CrfConfig: 10 iterations, DeepLab-LargeFOV kernels).

Speed: images/s of what predict.py runs per image (CRF + argmax -> uint8 labels), for
  pydensecrf-1      pydensecrf in this process, one image after the other
  pydensecrf-pool   pydensecrf in a spawn Pool of --workers processes (crf.workers), Pool.map
                    over the images as predict.py does (pool start-up not timed)
  torch-pool        the torch backend the same way, one torch thread per process (what
                    predict.py runs on the CPU with crf.workers > 1)
  torch-cpu         the torch backend in this process with torch's threads (all cores),
                    --batch images per call (predict.py with crf.workers = 1)
  torch-1thread     the same with one thread
  torch-cuda        the same code on the GPU, when there is one
CPU s/img: CPU time of the process per image (in-process methods): the cost per core, which
load from other processes inflates far less than the wall time.
The methods take turns round by round (--rounds); img/s is of the median round, best of the
fastest (load from other processes falls on all methods alike, but not equally: torch's OpenMP
threads stall when another process holds a core, pydensecrf's processes just slow down).
Peak memory per image: extra peak RSS (VmHWM reset after malloc_trim, minus RSS before) of one
image in a fresh process, after a warm-up on a small image; torch-cuda: max_memory_allocated.
Agreement: labels equal to pydensecrf-1's, % of all pixels and differing pixels; marginals of
torch against pydensecrf, max and mean absolute difference.
--profile prints torch.profiler's table of one torch-cpu image. --agreement-sweep runs only a
sweep of agreement over sizes, class counts, noise and iterations (112 cases, a few minutes).

Usage: .venv/bin/python benchmarks/bench_crf.py [--images 8] [--rounds 3] [--workers 2]
           [--batch 1] [--threads N] [--classes 21] [--iterations 10] [--noise 2.0] [--profile]
       .venv/bin/python benchmarks/bench_crf.py --agreement-sweep
Smoke: .venv/bin/python benchmarks/bench_crf.py --images 2 --rounds 1 --width 120 --height 90
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import itertools
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from aepsl.config import CrfConfig
from aepsl.inference.crf import (
    crf_job,
    crf_labels_torch,
    crf_pool,
    dense_crf,
    dense_crf_torch,
)
from aepsl.inference.crf_params import CrfParams
from aepsl.runtime import process_cpus

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photographs(n: int, width: int, height: int) -> list[np.ndarray]:
    from skimage import data

    images = []
    for i in range(n):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()[..., :3]
        image = np.asarray(Image.fromarray(photo).resize((width, height), Image.BILINEAR))
        images.append(np.ascontiguousarray(image[:, ::-1] if (i // len(PHOTOS)) % 2 else image))
    return images


def realistic_softmax(image: np.ndarray, classes: int, seed: int, noise: float) -> np.ndarray:
    """(K, H, W) float32: Felzenszwalb segments as truth, noisy one-hot, blurred, softmax."""
    from scipy.ndimage import gaussian_filter
    from skimage.segmentation import felzenszwalb

    rng = np.random.default_rng(seed)
    segments = felzenszwalb(image, scale=300, sigma=0.8, min_size=image.size // 600)
    sizes = np.bincount(segments.ravel())
    names = rng.integers(1, classes, sizes.size)
    names[sizes.argmax()] = 0
    truth = names[segments]
    logits = 4.0 * np.eye(classes, dtype=np.float32)[truth].transpose(2, 0, 1)
    logits += rng.normal(0, noise, logits.shape).astype(np.float32)
    logits = np.stack([gaussian_filter(channel, 4.0) for channel in logits])
    return torch.softmax(torch.from_numpy(logits), 0).numpy()


def make_data(args: argparse.Namespace) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images = photographs(args.images, args.width, args.height)
    probs = [
        realistic_softmax(im, args.classes, seed, args.noise) for seed, im in enumerate(images)
    ]
    return images, probs


# ------------------------------------------------------------------ methods


def run_pool(images, probs, params, backend, pool=None):
    """What predict.py runs on the CPU: (image, probs) jobs, one per process of the pool."""
    refine = crf_job(backend, params)
    jobs = list(zip(images, probs, strict=True))
    return pool.map(refine, jobs) if pool else [refine(job) for job in jobs]


def run_torch(images, probs, params, device="cpu", batch=1, threads=None):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    labels = crf_labels_torch(images, probs, device=device, batch=batch, params=params)
    torch.set_num_threads(before)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return labels


# ------------------------------------------------------------------ memory (child process)


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(key + r":\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def memory_child(args: argparse.Namespace) -> None:
    """Print the extra peak RSS (MiB per image) of one call of args.memory_child."""
    images, probs = make_data(args)
    count = args.batch if args.memory_child == "torch-cpu" else 1
    images, probs = images[:count], probs[:count]
    params = CrfParams.defaults(iterations=args.iterations)
    small = [im[:40, :50].copy() for im in images[:1]], [p[:, :40, :50].copy() for p in probs[:1]]
    if args.memory_child == "torch-cpu":
        run_torch(*small, params)  # warm-up: thread pools, allocator
        work = functools.partial(run_torch, images, probs, params, batch=count)
    else:
        run_pool(*small, params, "pydensecrf")
        work = functools.partial(run_pool, images, probs, params, "pydensecrf")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages would hide new allocations
    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    work()
    peak = _status()["VmHWM"]
    print(json.dumps({"mib_per_image": (peak - before) / 1024 / count}))


def peak_memory(args: argparse.Namespace, method: str) -> float | None:
    command = [sys.executable, __file__, "--memory-child", method]
    for key in ("images", "width", "height", "classes", "iterations", "batch", "noise"):
        command += [f"--{key}", str(getattr(args, key))]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  ({method} memory: {done.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["mib_per_image"]


# ------------------------------------------------------------------ agreement sweep


def agreement_sweep() -> None:
    """Labels and marginals of torch against pydensecrf over sizes (landscape, portrait, VOC),
    2 or 21 classes, logit noise 1 or 3, 1, 5 or 10 iterations, 4 photographs each."""
    torch.set_num_threads(1)
    cases = pixels = differ = 0
    worst, changed = 0.0, []
    sizes = [(500, 375), (333, 250), (250, 333)]
    for (width, height), classes, noise, iterations in itertools.product(
        sizes, [2, 21], [1.0, 3.0], [1, 5, 10]
    ):
        if (width, height) == (500, 375) and iterations != 10:
            continue  # VOC size at the default only: the sweep stays at a few minutes
        params = CrfParams.defaults(iterations=iterations)
        for i, image in enumerate(photographs(4, width, height)):
            prob = realistic_softmax(image, classes, i + 10 * classes, noise)
            ref = dense_crf(image, prob, params)
            (mine,) = dense_crf_torch([image], [prob], params=params)
            cases += 1
            pixels += ref[0].size
            differ += int((ref.argmax(0) != mine.argmax(0)).sum())
            worst = max(worst, float(np.abs(ref - mine).max()))
            changed.append(float(np.mean(ref.argmax(0) != prob.argmax(0))))
    print(
        f"{cases} cases, {pixels} pixels: {differ} labels differ "
        f"({100 * differ / pixels:.5f}%), marginals max |diff| {worst:.2e}; the CRF changed "
        f"{100 * np.mean(changed):.1f}% of the labels on average, {100 * max(changed):.1f}% at most"
    )


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=process_cpus(), help="crf.workers")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=CrfConfig().iterations)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--noise", type=float, default=2.0, help="std of the logit noise")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--agreement-sweep", action="store_true", help="only the sweep")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agreement_sweep:
        agreement_sweep()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    params = CrfParams.defaults(iterations=args.iterations)
    images, probs = make_data(args)
    n = len(images)
    print(
        f"{n} photographs at {args.width}x{args.height}, {args.classes} classes, "
        f"{args.iterations} iterations; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"{multiprocessing.cpu_count()} cores"
    )
    pools = {backend: crf_pool(backend, args.workers) for backend in ("pydensecrf", "torch")}
    tiny = [(im[:20, :20], p[:, :20, :20]) for im, p in zip(images, probs, strict=True)]
    for backend, pool in pools.items():  # start the workers before timing
        pool.map(crf_job(backend, params), tiny[:1] * args.workers)
    methods = {
        "pydensecrf-1": lambda: run_pool(images, probs, params, "pydensecrf"),
        f"pydensecrf-pool{args.workers}": lambda: run_pool(
            images, probs, params, "pydensecrf", pools["pydensecrf"]
        ),
        f"torch-pool{args.workers}": lambda: run_pool(
            images, probs, params, "torch", pools["torch"]
        ),
        "torch-cpu": lambda: run_torch(images, probs, params, batch=args.batch),
        "torch-1thread": lambda: run_torch(images, probs, params, batch=args.batch, threads=1),
    }
    if torch.cuda.is_available():
        methods["torch-cuda"] = lambda: run_torch(images, probs, params, "cuda", args.batch)
    run_torch(images[:1], probs[:1], params)  # warm-up
    if "torch-cuda" in methods:
        run_torch(images[:1], probs[:1], params, "cuda")
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    outputs = {}
    for _ in range(args.rounds):
        for name, method in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = method()
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    for pool in pools.values():
        pool.close()
        pool.join()

    memory = {name: peak_memory(args, name) for name in ("pydensecrf-1", "torch-cpu")}
    if "torch-cuda" in methods:
        torch.cuda.reset_peak_memory_stats()
        run_torch(images[: args.batch], probs[: args.batch], params, "cuda", args.batch)
        memory["torch-cuda"] = torch.cuda.max_memory_allocated() / 2**20 / args.batch

    load = os.getloadavg()[0]
    reference = outputs["pydensecrf-1"]
    header = (
        f"{'img/s':>7s} {'best':>7s} {'s/img':>7s} {'CPU s/img':>9s} {'rounds (s)':>20s} "
        f"{'peak MiB/img':>13s}"
    )
    print(f"\n{'method':18s} {header}  labels = pydensecrf's")
    for name, times in seconds.items():
        median = statistics.median(times)
        differ = sum(int((a != b).sum()) for a, b in zip(outputs[name], reference, strict=True))
        agree = 1 - differ / sum(a.size for a in reference)
        mem = memory.get(name)
        in_process = "pool" not in name and "cuda" not in name
        cpu_time = f"{statistics.median(cpu[name]) / n:.3f}" if in_process else ""
        print(
            f"{name:18s} {n / median:7.2f} {n / min(times):7.2f} {median / n:7.3f} "
            f"{cpu_time:>9s} {' '.join(f'{t:.2f}' for t in times):>20s} "
            f"{'' if mem is None else f'{mem:.0f}':>13s} {100 * agree:9.4f}% ({differ} px)"
        )

    # marginals: pydensecrf against torch-cpu, and how much the CRF changed the labels
    mine = dense_crf_torch(images, probs, params=params)
    worst, mean, changed = 0.0, [], []
    for image, prob, q in zip(images, probs, mine, strict=True):
        ref = dense_crf(image, prob, params)
        worst = max(worst, float(np.abs(ref - q).max()))
        mean.append(float(np.abs(ref - q).mean()))
        changed.append(float(np.mean(ref.argmax(0) != prob.argmax(0))))
    print(f"load average (1 min) after the timed rounds: {load:.2f} on {os.cpu_count()} cores")
    print(
        f"\nmarginals torch vs pydensecrf: max |diff| {worst:.2e}, mean |diff| "
        f"{np.mean(mean):.2e}; the CRF changed {100 * np.mean(changed):.1f}% of the labels"
    )
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            run_torch(images[:1], probs[:1], params)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
