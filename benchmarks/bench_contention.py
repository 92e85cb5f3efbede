"""Two aepsl processes on one machine (issue 29): how much of its speed each keeps when another
torch job holds the cores, under OpenMP's active (spinning) and passive (sleeping) waits.

A short `aepsl mine` (demo_tiny, one erasing step) runs alone, then twice at once, under each
wait policy; the share is alone / side-by-side wall time (0.5 is a fair share of a machine both
need in full). A lone run of the demo preset's EfficientNet-Lite0 is timed too, since a policy
that shares well can cost the run alone.

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

from aepsl.runtime import usable_cpus

POLICIES = {  # libgomp's: no OMP_WAIT_POLICY spins GOMP_SPINCOUNT's default 300,000 times
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "default": {"GOMP_SPINCOUNT": "300000"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def mine(
    data: Path, out: Path, epochs: int, policy: str, preset: str = "demo_tiny"
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy], PYTHONWARNINGS="ignore")
    argv = [sys.executable, "-m", "aepsl", "mine", preset, f"data.root={data}"]
    argv += ["mine.steps=1", f"mine.epochs={epochs}", "mine.visualise=0", "--out", str(out)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timed(
    data: Path, base: Path, epochs: int, policy: str, count: int, preset: str = "demo_tiny"
) -> float:
    """Wall seconds of `count` runs of `preset` started together (the slowest)."""
    started = time.perf_counter()
    runs = [
        mine(data, base / f"{policy}-{preset}-{count}-{k}", epochs, policy, preset)
        for k in range(count)
    ]
    if any(run.wait() for run in runs):
        raise SystemExit(f"a run failed under {POLICIES[policy]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        data = base / "data"
        subprocess.run(
            [sys.executable, "-m", "aepsl", "synth", str(data), "--n", str(args.images)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"{usable_cpus()} usable CPUs; aepsl mine, demo_tiny, 1 step of {args.epochs} epochs")
        print("demo alone: the demo preset (EfficientNet-Lite0), 1 step of 2 epochs, alone")
        header = f"{'wait':<10}{'alone s':>9}{'two at once s':>15}{'share each':>12}"
        print(header + f"{'demo alone s':>14}")
        for policy in args.policies:
            alone = timed(data, base, args.epochs, policy, 1)
            pair = timed(data, base, args.epochs, policy, 2)
            demo = timed(data, base, 2, policy, 1, "demo")
            print(f"{policy:<10}{alone:>9.1f}{pair:>15.1f}{alone / pair:>12.2f}{demo:>14.1f}")


if __name__ == "__main__":
    main()
