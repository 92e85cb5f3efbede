"""Scaling with the dataset (issue 6, fig. 5): wall time and peak memory of `aepsl mine` on N
and 2N images. Linear work gives a wall-time ratio near 2; streaming data gives a peak-RSS
ratio near 1 (nothing per image kept in memory).

The real command line runs as a child process, `python -m aepsl mine CONFIG key=value ...
--out RUN` with a fresh RUN each time, on `aepsl synth` data (make_synth, seed 0, --size px;
the first N images of the 2N set are the N set). Settings: --config (default: the package's
configs/demo_tiny.yaml) with mine.epochs=--epochs and mine.steps=--steps, then any key=value
overrides. Peak RSS comes from `/usr/bin/time -v` when it exists, else from os.wait4 on the
child. Runs alternate N, 2N, N, 2N, ... --repeats times; each size's best wall time and
median peak RSS are compared. Child start-up (interpreter + imports) is timed too, so the ratio
without that fixed cost is printed beside the raw one.

Usage: .venv/bin/python benchmarks/bench_scaling.py [--n 120] [--size 128] [--epochs 2]
           [--steps 1] [--repeats 2] [--config YAML] [key=value ...]
Smoke: .venv/bin/python benchmarks/bench_scaling.py --n 16 --size 64 --epochs 1 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aepsl
from aepsl.data.synth import make_synth

TIME = Path("/usr/bin/time")
DEMO = Path(aepsl.__file__).parent / "configs" / "demo_tiny.yaml"
RSS_TARGET = 1.2


def run_child(command: list[str], log: Path) -> tuple[float, float]:
    """Run `command` to completion; (wall seconds, peak RSS in MiB). Exits on failure."""
    use_time = TIME.is_file() and os.access(TIME, os.X_OK)
    report = log.with_suffix(".time")
    full = [str(TIME), "-v", "-o", str(report), *command] if use_time else command
    with log.open("wb") as out:
        start = time.perf_counter()
        child = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"failed ({code}): {' '.join(command)}\n" + "\n".join(tail))
    if use_time:
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report.read_text())
        if found is None:
            sys.exit(f"{report}: no 'Maximum resident set size' line from {TIME}")
        return wall, int(found.group(1)) / 1024
    return wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--config", default=str(DEMO), help="preset YAML (default: demo_tiny.yaml)")
    parser.add_argument("--n", type=int, default=120, help="images of the smaller dataset")
    parser.add_argument("--size", type=int, default=128, help="synth image side in px")
    parser.add_argument("--epochs", type=int, default=2, help="mine.epochs")
    parser.add_argument("--steps", type=int, default=1, help="mine.steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs per dataset size")
    args = parser.parse_intermixed_args()
    if min(args.epochs, args.steps, args.repeats) < 1 or args.n < 4 or args.size < 48:
        parser.error("--epochs, --steps, --repeats must be positive; --n >= 4; --size >= 48")
    tool = f"{TIME} -v" if TIME.is_file() else "os.wait4 (no /usr/bin/time)"
    print(
        f"peak RSS from {tool}; settings {args.config} mine.epochs={args.epochs} "
        f"mine.steps={args.steps} {' '.join(args.overrides)}".rstrip()
    )

    sizes = [args.n, 2 * args.n]
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        work = Path(tmp)
        roots = {n: make_synth(work / f"synth{n}", n=n, size=args.size, seed=0) for n in sizes}
        results: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
        startup = []
        for repeat in range(args.repeats):
            startup.append(
                run_child(
                    [sys.executable, "-c", "import aepsl.cli, aepsl.mine.stage"],
                    work / f"startup{repeat}.log",
                )
            )
            for n in sizes:
                out = work / f"run{n}_{repeat}"
                command = [
                    sys.executable, "-m", "aepsl", "mine", args.config,
                    f"data.root={roots[n]}",
                    f"mine.epochs={args.epochs}",
                    f"mine.steps={args.steps}",
                    *args.overrides,
                    "--out", str(out),
                ]  # fmt: skip
                wall, rss = run_child(command, work / f"run{n}_{repeat}.log")
                results[n].append((wall, rss))
                print(f"  N={n:5d} run {repeat + 1}: wall {wall:7.2f} s, peak RSS {rss:7.1f} MiB")
                shutil.rmtree(out)

    start_wall = min(w for w, _ in startup)
    start_rss = statistics.median(r for _, r in startup)
    print(f"  child start-up (python + imports): {start_wall:.2f} s, {start_rss:.1f} MiB")
    wall = {n: min(w for w, _ in results[n]) for n in sizes}
    rss = {n: statistics.median(r for _, r in results[n]) for n in sizes}
    small, large = sizes
    # Meaningless when start-up is most of the small run or timed under a load spike.
    net = (
        f"{(wall[large] - start_wall) / (wall[small] - start_wall):.2f}x"
        if wall[small] - start_wall > 0.1 * wall[small]
        else "n/a (start-up not well below the N run; noisy machine?)"
    )
    print(
        f"  best wall: N={small} {wall[small]:.2f} s, N={large} {wall[large]:.2f} s; "
        f"without start-up {net}"
    )
    print(
        f"  peak RSS above start-up: N={small} {rss[small] - start_rss:.1f} MiB, "
        f"N={large} {rss[large] - start_rss:.1f} MiB"
    )
    print(
        f"aepsl mine N={small} -> {large} images: wall time {wall[large] / wall[small]:.2f}x "
        f"(target near 2), peak RSS {rss[large] / rss[small]:.2f}x (target <= {RSS_TARGET})"
    )


if __name__ == "__main__":
    main()
