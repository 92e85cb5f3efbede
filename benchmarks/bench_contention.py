"""Two aepsl processes on one machine (issue 29): how much of its speed each keeps when another
torch job holds the cores, under OpenMP's active (spinning) and passive (sleeping) waits.

A short `aepsl mine` (demo_tiny, one erasing step) runs alone, then twice at once, under each
wait policy; the share is alone / side-by-side wall time (0.5 is a fair share of a machine both
need in full). `aepsl` sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it.

    python benchmarks/bench_contention.py [--epochs 6] [--images 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def mine(data: Path, out: Path, epochs: int, policy: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "aepsl", "mine", "demo_tiny", f"data.root={data}"]
    argv += ["mine.steps=1", f"mine.epochs={epochs}", "mine.visualise=0", "--out", str(out)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(data: Path, base: Path, epochs: int, policy: str, count: int) -> float:
    """Wall seconds of `count` runs started together (the slowest)."""
    started = time.perf_counter()
    runs = [mine(data, base / f"{policy}-{count}-{k}", epochs, policy) for k in range(count)]
    if any(run.wait() for run in runs):
        raise SystemExit(f"a run failed under OMP_WAIT_POLICY={policy}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        data = base / "data"
        subprocess.run(
            [sys.executable, "-m", "aepsl", "synth", str(data), "--n", str(args.images)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{cpus} usable CPUs; aepsl mine, demo_tiny, 1 step of {args.epochs} epochs")
        print(f"{'OMP_WAIT_POLICY':<16}{'alone s':>9}{'two at once s':>15}{'share each':>12}")
        for policy in ("ACTIVE", "PASSIVE"):
            alone = timed(data, base, args.epochs, policy, 1)
            pair = timed(data, base, args.epochs, policy, 2)
            print(f"{policy:<16}{alone:>9.1f}{pair:>15.1f}{alone / pair:>12.2f}")


if __name__ == "__main__":
    main()
