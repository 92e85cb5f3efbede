"""`aepsl demo`: the method end to end on synthetic data, with a summary a person can read."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from aepsl.config import load_config, save_config
from aepsl.data.synth import make_synth
from aepsl.inference.predict import evaluate_trained
from aepsl.labels.stage import run_labels
from aepsl.mine.stage import run_mine
from aepsl.psl.stage import run_train
from aepsl.runtime import select_device

DEMO_CONFIG = files("aepsl") / "configs" / "demo.yaml"


def run_demo(out: Path, overrides: list[str], n: int = 240, size: int = 128) -> dict:
    started = time.perf_counter()
    data_root = out / "data"
    config = load_config(Path(str(DEMO_CONFIG)), [f"data.root={data_root}", *overrides])
    if not (data_root / "labels.csv").is_file():
        make_synth(data_root, n=n, size=size, seed=config.seed)
    save_config(config, out)
    mine = run_mine(config, out)
    labels = run_labels(config, out)
    model = run_train(config, out)
    val = evaluate_trained(config, out, model, select_device(config))
    elapsed = time.perf_counter() - started
    print(summary(mine, labels, val, elapsed))
    return {"mine": mine, "labels": labels, "val": val, "seconds": elapsed}


def summary(mine: dict, labels: dict, val: dict, seconds: float) -> str:
    """Per erasing step: loss, val mAP, step and union region precision / recall."""
    lines = [
        "",
        f"Adversarial erasing ({mine['threshold_mode']} threshold {mine['threshold']}):",
        f"{'step':>5}{'loss':>8}{'val mAP':>9}{'step P':>8}{'step R':>8}"
        f"{'union P':>9}{'union R':>9}",
    ]
    for s in mine["steps"]:
        step, union = s.get("step_regions") or {}, s.get("union_regions") or {}

        def fmt(x: float | None, width: int) -> str:
            return f"{x:>{width}.3f}" if isinstance(x, float) else f"{'-':>{width}}"

        lines.append(
            f"{s['step']:>5}{s['train_loss']:>8.4f}{fmt(s.get('val_mAP'), 9)}"
            f"{fmt(step.get('precision'), 8)}{fmt(step.get('recall'), 8)}"
            f"{fmt(union.get('precision'), 9)}{fmt(union.get('recall'), 9)}"
        )
    if labels.get("mIoU") is not None:
        lines.append(
            f"pseudo labels ({labels['saliency_source']} saliency, bg < {labels['bg_threshold']}): "
            f"mIoU {labels['mIoU']:.3f} over labelled pixels, "
            f"{labels['labelled_fraction']:.1%} of pixels labelled"
        )
    for key, name in (("without_crf", "without CRF"), ("with_crf", "with CRF")):
        if val.get(key):
            lines.append(f"segmentation, {val['split']} mIoU {name}: {val[key]['mIoU']:.3f}")
    if val.get("note"):
        lines.append(val["note"])
    lines.append(f"wall time: {seconds:.0f} s")
    return "\n".join(lines)
