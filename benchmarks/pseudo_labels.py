"""Pseudo-label quality by saliency source, background threshold and number of erasing steps.

Needs a run whose `mine` kept its CAMs (mine.save_cams=true) and a dataset with masks:

    python benchmarks/pseudo_labels.py configs/demo_tiny.yaml --out runs/demo \
        data.root=runs/demo/data
"""

import argparse
import tempfile
from pathlib import Path

from aepsl.config import load_config
from aepsl.io import write_index_png
from aepsl.labels.stage import run_labels
from aepsl.mine.extract import union_of_steps


def union_run(source: Path, steps: int, scratch: Path, saliency_cache: Path) -> Path:
    """A run folder whose mine/regions is the union of the first `steps` steps of `source`."""
    run = scratch / f"union{steps}"
    (run / "mine").mkdir(parents=True)
    (run / "saliency").symlink_to(saliency_cache, target_is_directory=True)
    for step in range(1, steps + 1):
        (run / "mine" / f"step{step}").symlink_to(source / "mine" / f"step{step}")
    for path in sorted((source / "mine" / "step1" / "regions").glob("*.png")):
        union = union_of_steps(source, path.stem, list(range(1, steps + 1)))
        write_index_png(run / "mine" / "regions" / path.name, union)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, help="run folder holding mine/ with saved CAMs")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_intermixed_args()  # --out between the config and its overrides
    source = Path(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "saliency"
        cache.mkdir()
        for steps in range(1, args.steps + 1):
            run = union_run(source, steps, Path(scratch), cache)
            settings = [
                ("builtin", f"labels.bg_threshold={t}") for t in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)
            ]
            settings += [("none", f"labels.cam_bg_threshold={t}") for t in (0.05, 0.1, 0.2)]
            for source_name, threshold in settings:
                config = load_config(
                    args.config,
                    [
                        *args.overrides,
                        f"saliency.source={source_name}",
                        threshold,
                        "labels.visualise=0",
                    ],
                )
                metrics = run_labels(config, run)
                rows.append((steps, source_name, threshold.split("=")[1], metrics))
    print(f"{'steps':>5} {'saliency':<9}{'bg thr':>7}{'mIoU':>7}{'labelled':>10}")
    for steps, source_name, threshold, m in rows:
        miou, labelled = m["mIoU"], m["labelled_fraction"]
        print(f"{steps:>5} {source_name:<9}{threshold:>7}{miou:>7.3f}{labelled:>10.3f}")


if __name__ == "__main__":
    main()
