"""Step-1 CAM threshold sweep beside the erasing union's points (run `mine` with save_cams).

python benchmarks/sweep_threshold.py configs/demo_tiny.yaml --out runs/demo data.root=runs/synth
"""

import argparse
from pathlib import Path

from aepsl.config import load_config
from aepsl.data.datasets import load_dataset
from aepsl.mine.sweep import sweep_step_cams, union_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, help="the run folder that holds mine/")
    parser.add_argument("--mode", default="relative", choices=["relative", "quantile"])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    data = load_dataset(config.data)
    mine = Path(args.out) / "mine"
    thresholds = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    if args.mode == "quantile":
        thresholds = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]
    rows = sweep_step_cams(
        data, config.data.train_split, mine / "step1" / "cams", thresholds, args.mode
    )
    print(f"step-1 CAM, {args.mode} threshold sweep:")
    print(f"{'threshold':>10}{'precision':>11}{'recall':>8}")
    for row in rows:
        print(f"{row['threshold']:>10}{row['precision']:>11.3f}{row['recall']:>8.3f}")
    print(f"erasing union ({config.mine.threshold_mode} {config.mine.threshold}):")
    for point in union_points(mine / "metrics.json"):
        print(
            f"{'step ' + str(point['step']):>10}{point['precision']:>11.3f}{point['recall']:>8.3f}"
        )


if __name__ == "__main__":
    main()
