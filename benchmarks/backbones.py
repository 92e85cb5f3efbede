"""The tiny CNN from scratch and the ImageNet EfficientNet-Lite0 side by side: step-1 CAM
precision / recall across thresholds, the erasing union after each step, and the pseudo labels,
each backbone with its demo preset (configs/demo_tiny.yaml, configs/demo.yaml).

    python benchmarks/backbones.py --out runs/backbones            # `synth --real` data
    python benchmarks/backbones.py --out runs/backbones --synth    # `synth` data

Each preset runs `mine` (with its CAMs kept) and `labels` in OUT/<preset>; finished stages are
skipped on a re-run, so the table can be printed again cheaply. Any key=value is applied to both.
"""

import argparse
from pathlib import Path

import aepsl
from aepsl.config import load_config
from aepsl.data.datasets import load_dataset
from aepsl.data.real import make_real
from aepsl.data.synth import make_synth
from aepsl.labels.stage import run_labels
from aepsl.mine.stage import run_mine
from aepsl.mine.sweep import sweep_step_cams, union_points

CONFIGS = Path(aepsl.__file__).parent / "configs"
PRESETS = {"tiny": "demo_tiny.yaml", "lite0": "demo.yaml"}
THRESHOLDS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def pair(row: dict[str, float]) -> str:
    return f"{row['precision']:.3f} / {row['recall']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--synth", action="store_true", help="synthetic shapes, not real pixels")
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    root = args.out / ("data_synth" if args.synth else "data_real")
    if not (root / "labels.csv").is_file():
        (make_synth if args.synth else make_real)(root, n=args.n, size=args.size)
    sweeps, unions, labels = {}, {}, {}
    for name, preset in PRESETS.items():
        config = load_config(
            CONFIGS / preset, [f"data.root={root}", "mine.save_cams=true", *args.overrides]
        )
        run = args.out / name
        run_mine(config, run)
        labels[name] = run_labels(config, run)
        data = load_dataset(config.data)
        cams = run / "mine" / "step1" / "cams"
        sweeps[name] = sweep_step_cams(data, config.data.train_split, cams, THRESHOLDS)
        unions[name] = union_points(run / "mine" / "metrics.json")

    print(f"\n{root.name}, {args.n} images of {args.size} px; precision / recall of regions")
    print(f"{'step-1 CAM threshold':>22}{'tiny':>18}{'lite0':>18}")
    for k, threshold in enumerate(THRESHOLDS):
        print(f"{threshold:>22}{pair(sweeps['tiny'][k]):>18}{pair(sweeps['lite0'][k]):>18}")
    print(f"{'union (threshold 0.8)':>22}")
    for tiny, lite0 in zip(unions["tiny"], unions["lite0"], strict=False):
        print(f"{'after step ' + str(tiny['step']):>22}{pair(tiny):>18}{pair(lite0):>18}")
    print(f"{'pseudo-label mIoU':>22}", end="")
    for name in PRESETS:
        cell = f"{labels[name]['mIoU']:.3f} ({labels[name]['labelled_fraction']:.0%})"
        print(f"{cell:>18}", end="")
    print()


if __name__ == "__main__":
    main()
