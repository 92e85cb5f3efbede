"""Robustness: the whole method with the own-data preset (configs/own_data.yaml) on a grid of
generated data sets (image side, number of classes, objects per image, `synth` or `synth
--real`), over seeds, with the old defaults ("before") beside the current ones ("after").

    python benchmarks/robustness.py --out runs/robustness --quick      # smoke, about a minute
    python benchmarks/robustness.py --out runs/robustness    # the grid of docs/robustness.md
    python benchmarks/robustness.py --out runs/rob --sides 64,128,320 --classes 2,5,20 \\
        --objects 1,4 --kinds synth,real --seeds 0,1 --n 120 --epochs-scale 0.5

A cell is (side, classes, objects, kind); per seed it generates its data (the seed is the data's
and the method's) and runs `aepsl run` into OUT/<cell>/seed<s>/<variant>:

- after:  the preset as it is, plus `mine.save_cams=true` (for the threshold sweep);
- before: the old defaults, `mine.cam_size=native train.upscale_small=false
  train.image_size=null`, the training length fixed at `train.iterations=400` (the demo's)
  instead of `train.epochs`, and PSL (`train.psl=true`);
- sup: the ceiling, the preset's segmentation network trained on the cell's ground-truth masks
  (`labels.dir=DATA/masks`: no mining, no pseudo labels; same network, crops, schedule and
  length as after). Every other variant's val mIoU is also given as a fraction of sup's, per
  seed (the columns /sup);
- steps1 / ms1 / round2 / crfrefine / crffill / nofill (--levers), each built on a finished after:
  steps1 the pseudo labels from after's step-1 CAMs alone (`labels.cams_dir`: one erasing step,
  no mining again); ms1 one erasing step with after's step-1 classifier (copied: its training
  does not depend on how CAMs are taken, so its time leaves that training out) and CAMs at the
  field's scales 1.0 / 0.5 / 1.5 / 2.0, flipped too (`mine.steps=1 mine.cam_scales=...
  mine.cam_flip=true`): against steps1, the multi-scale CAMs alone; round2 the network
  retrained on after's CRF-refined predictions of the training images, classes the image is
  not tagged with unlabelled (`aepsl predict --split train --crf`, then labels.dir);
  crfrefine / crffill after's mine/ (copied) with a dense CRF on the pseudo labels
  (`labels.crf=refine` / `fill`); nofill after's mine/ (copied) with the salient pixels no step
  mined left unlabelled (`labels.salient_fill=false`, the preset's until the eighth pass of
  docs/robustness.md; that pass's `fill` runs are today's `after`, its `after` today's `nofill`);
- psl / nopsl: (--psl-ablation) `after` with `train.psl` the other way round: `psl` (PSL on)
  when the preset trains on the pseudo labels alone, as own_data.yaml does, `nopsl` (the pseudo
  labels alone) when it trains with PSL; it reuses after's mine/ and labels/ (copied), so only
  training runs. An OUT made when the preset had PSL on holds `after` runs with PSL and
  `nopsl` runs without: rename them `psl` and `after` to reuse them, or they are retrained.

`--epochs-scale F` multiplies mine.epochs (rounded, at least 1), train.epochs, the preset's
mine.min_positives and train.min_iterations, and before's 400 iterations. Each run folder skips
its finished stages, so a re-run prints the table without recomputing finished cells; wall time
is that of the run that computed it (OUT/.../time.json), marked * when that run reused mine/ and
labels/ finished earlier with the same settings (the PSL ablation always does): then it is
train and predict only.

Per cell and variant the table gives step-1 and union region precision / recall (train split),
the pseudo labels' mIoU, val mIoU without / with CRF and wall time, as mean ± half the
difference of two seeds (mean ± half the range with more). Below it, per cell, in words:

- erasing vs one threshold: the step-1 CAMs (saved by `after`) are thresholded at 0.9 ... 0.1
  (relative, `aepsl.mine.sweep`); the recall that curve reaches at the union's final precision
  (linear between neighbouring thresholds) is compared with the union's recall. Erasing beat
  the threshold when the union's recall is higher in every seed and by a point (0.01) or more
  on average; lost, the reverse; else no clear difference.
- PSL vs pseudo labels alone (with --psl-ablation), 3 erasing steps vs 1, a second round vs
  one and the CRF on the pseudo labels vs none (with --levers): val mIoU with CRF of one run
  minus the other's, per seed, called the same way.
- collapse: a run whose val mIoU without CRF is at most the all-background score + 0.01 (every
  pixel predicted background, scored the same way), or whose val predictions give one class
  95% of the pixels (the health warning of that name).
- warned: a run whose stages left any health warning (also a class never mined, labelled or
  predicted): not healthy, though not necessarily collapsed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import aepsl
from aepsl.config import Config, load_config
from aepsl.data.datasets import load_dataset
from aepsl.data.real import make_real
from aepsl.data.synth import make_synth
from aepsl.health import ONE_CLASS
from aepsl.io import read_index_png, write_index_png
from aepsl.layout import RunLayout, stage_digests
from aepsl.mine.sweep import sweep_step_cams, union_points

PRESET = Path(aepsl.__file__).parent / "configs" / "own_data.yaml"
THRESHOLDS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
OLD_ITERATIONS = 400
# (side, classes, objects, kind): the grid of docs/robustness.md
DEFAULT_CELLS = "128x5x2:synth,64x5x2:synth,96x10x3:real,128x2x1:synth,128x20x4:synth,320x5x2:synth"
QUICK = {
    "cells": "64x3x2:synth",
    "seeds": "0",
    "n": 24,
    "epochs_scale": 0.05,
    "images_per_class": 8,
}
COLLAPSE_MARGIN = 0.01
TARGET = 0.90  # of the ceiling, with CRF (issue 25)
MIN_DIFFERENCE = 0.01  # a paired difference smaller than a point is not called a finding


@dataclass(frozen=True)
class Cell:
    side: int
    classes: int
    objects: int
    kind: str

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.side}px_{self.classes}cls_{self.objects}obj"


def parse_cells(text: str) -> list[Cell]:
    cells = []
    for item in text.split(","):
        try:
            dims, kind = item.strip().split(":")
            side, classes, objects = (int(v) for v in dims.split("x"))
        except ValueError:
            raise SystemExit(f"--cells: '{item}' is not SIDExCLASSESxOBJECTS:KIND") from None
        if kind not in ("synth", "real"):
            raise SystemExit(f"--cells: kind must be synth or real, got '{kind}'")
        cells.append(Cell(side, classes, objects, kind))
    return cells


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


PSL_RUNS = ("psl", "nopsl")
LEVERS = ("steps1", "ms1", "round2", "crfrefine", "crffill", "nofill")  # --levers: on after
MULTI_SCALE = ["mine.cam_scales=[1.0,0.5,1.5,2.0]", "mine.cam_flip=true"]  # the field's (IRN's)
LABEL_CRF = {"crfrefine": "refine", "crffill": "fill"}  # after's regions, labels.crf set
LABEL_LEVERS = {  # after's mine/ (copied, same settings), labels built another way
    **{name: f"labels.crf={mode}" for name, mode in LABEL_CRF.items()},
    "nofill": "labels.salient_fill=false",
}
ROUND2_LABELS = "round2_labels"  # the PSL ablation's run, named after its train.psl


def variant_overrides(variant: str, scale: float, preset: Config, data: Path) -> list:
    """`aepsl run` overrides of a variant on the data set `data`, lengths multiplied by
    `scale`."""
    mine, train = preset.mine, preset.train
    train_length = [
        f"train.epochs={train.epochs * scale:g}",
        f"train.min_iterations={round(train.min_iterations * scale)}",
    ]
    if variant == "sup":  # the ceiling: the same training on the real masks
        return [f"labels.dir={data / 'masks'}", *train_length]
    if variant == "steps1":  # erasing's ablation: pseudo labels from after's step-1 CAMs
        step1 = data.parent / "after" / "mine" / "step1" / "cams"
        return [f"labels.cams_dir={step1}", *train_length]
    if variant == "round2":  # a second round on after's CRF-refined training predictions
        return [f"labels.dir={data.parent / ROUND2_LABELS}", *train_length]
    common = [f"mine.epochs={max(1, round(mine.epochs * scale))}", "mine.save_cams=true"]
    if variant == "before":
        return [
            *common,
            "mine.min_positives=0",
            "train.min_iterations=0",
            "mine.cam_size=native",
            "train.upscale_small=false",
            "train.image_size=null",
            f"train.iterations={max(1, round(OLD_ITERATIONS * scale))}",
            "train.psl=true",  # the old own-data preset trained with PSL
        ]
    after = [*common, f"mine.min_positives={round(mine.min_positives * scale)}", *train_length]
    if variant in LABEL_LEVERS:
        return [*after, LABEL_LEVERS[variant]]
    if variant == "ms1":  # one step, after's step-1 classifier (copied), multi-scale CAMs
        return [*after, "mine.steps=1", *MULTI_SCALE]
    return after + ([f"train.psl={str(variant == 'psl').lower()}"] if variant in PSL_RUNS else [])


def make_data(cell: Cell, seed: int, n: int, root: Path) -> Path:
    """The cell's data set for `seed` in `root`, generated unless it is there with n images."""
    splits = root / "splits"
    if not (splits / "val.txt").is_file():
        make = make_real if cell.kind == "real" else make_synth
        make(root, n=n, size=cell.side, seed=seed, classes=cell.classes, objects=cell.objects)
    held = sum(len((splits / f"{s}.txt").read_text().split()) for s in ("train", "val"))
    if held != n:
        raise SystemExit(f"{root}: holds {held} images, not {n}; delete it or give the same --n")
    return root


def expected_digests(data: Path, overrides: list[str]) -> dict[str, str]:
    return stage_digests(load_config(PRESET, [f"data.root={data}", *overrides]))


def finished_timing(run: Path, train_hash: str) -> dict[str, Any] | None:
    """The time.json of `run` when its train stage finished with the settings hash
    `train_hash` (which chains mine's and labels'), else None."""
    timing, manifest = run / "time.json", run / "train" / "manifest.json"
    if not (timing.is_file() and manifest.is_file()):
        return None
    record = json.loads(manifest.read_text())
    if not record.get("complete") or record.get("settings_hash") != train_hash:
        return None
    return json.loads(timing.read_text())


def reused_stages(run: Path, digests: dict[str, str]) -> list[str]:
    """The stages an `aepsl run` into `run` will skip: finished with the same settings."""
    reused = []
    for stage in ("mine", "labels"):
        manifest = read(run / stage / "manifest.json")
        if manifest.get("complete") and manifest.get("settings_hash") == digests[stage]:
            reused.append(stage)
    return reused


def run_variant(
    run: Path, data: Path, overrides: list[str], threads: int | None
) -> dict[str, Any] | None:
    """`aepsl run` into `run` (skips finished stages); its time.json: the wall time of the run
    that computed it and the stages it reused from an earlier run (not in that time), None when
    it failed."""
    digests = expected_digests(data, overrides)
    done = finished_timing(run, digests["train"])
    if done is not None:
        return done
    timing = run / "time.json"
    run.mkdir(parents=True, exist_ok=True)
    reused = reused_stages(run, digests)
    cmd = [sys.executable, "-m", "aepsl", "run", str(PRESET), "--out", str(run)]
    cmd += [f"data.root={data}", *overrides]
    env = None
    if threads:
        import os

        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(run.parent / f"{run.name}.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        print(f"  {run}: aepsl run failed (exit {code}); see {run.parent / (run.name + '.log')}")
        return None
    # an interrupted run's earlier time counts; a run made with other settings' does not
    earlier = read(timing)
    if earlier.get("train_hash") == digests["train"]:
        seconds += earlier["seconds"]
        reused = earlier.get("reused", [])
    record = {
        "seconds": round(seconds, 1),
        "reused": reused,
        "overrides": overrides,
        "train_hash": digests["train"],
    }
    timing.write_text(json.dumps(record) + "\n")
    return record


def round2_labels(base: Path, data: Path, overrides: list[str]) -> None:
    """base/round2_labels from a finished after: its network's CRF-refined predictions of the
    training images (`aepsl predict --split train --crf`), a class the image is not tagged
    with made 255 (unlabelled)."""
    labels = base / ROUND2_LABELS
    if (labels / "done").is_file():
        return
    model = base / "after" / "train" / "model.pt"
    predicted = base / "round2_predict"
    cmd = [sys.executable, "-m", "aepsl", "predict", str(PRESET), f"data.root={data}"]
    cmd += [*overrides, "--checkpoint", str(model), "--split", "train", "--crf"]
    cmd += ["--out", str(predicted)]
    with open(base / "round2_predict.log", "a") as log:
        if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT) != 0:
            raise SystemExit(f"{base}: aepsl predict failed; see {base / 'round2_predict.log'}")
    config = load_config(PRESET, [f"data.root={data}"])
    labels.mkdir(exist_ok=True)
    for sample in load_dataset(config.data).split(config.data.train_split):
        label = read_index_png(predicted / f"{sample.id}.png")
        tagged = np.isin(label, (0, *sample.labels))
        write_index_png(labels / f"{sample.id}.png", np.where(tagged, label, 255).astype(np.uint8))
    (labels / "done").write_text("")


def copy_stages(src: Path, dst: Path, stages: tuple[str, ...] = ("mine", "labels")) -> None:
    """The PSL ablation starts from after's mine/ and labels/ (same settings hash: skipped), the
    label levers from its mine/ and saliency cache, once after has finished: a copy of stages
    still being written would resume them there."""
    if not (src / "train" / "metrics.json").is_file():
        return
    for stage in stages:
        if (src / stage).is_dir() and not (dst / stage).exists():
            shutil.copytree(src / stage, dst / stage)


def copy_step1_classifier(after: Path, run: Path, config: Config) -> None:
    """Start `run`'s mining (claimed for `config`'s settings, so `aepsl run` resumes it) with
    after's trained step-1 classifier: the step then only takes its CAMs. A mine folder of
    other settings is emptied by the claim, so the copy is made again, not trained anew."""
    source, layout = RunLayout(after, config).step(1), RunLayout(run, config)
    target = layout.step(1)
    if not (after / "train" / "metrics.json").is_file():
        return
    if layout.claim("mine") or target.classifier.is_file():
        return  # finished with these settings, or the copy is there
    target.root.mkdir(parents=True, exist_ok=True)
    for name in ("train.json", "classifier.pt"):  # the classifier last: the step's marker
        shutil.copy2(source.root / name, target.root / name)


def all_background_miou(data_root: Path) -> float:
    """val mIoU of predicting background everywhere: background IoU is its pixel share, every
    class present in the val masks scores 0 (classes absent from both are not counted)."""
    names = (data_root / "splits" / "val.txt").read_text().split()
    background = total = 0
    present: set[int] = set()
    for image_id in names:
        mask = read_index_png(data_root / "masks" / f"{image_id}.png")
        valid = mask != 255
        background += int((mask[valid] == 0).sum())
        total += int(valid.sum())
        present |= {int(v) for v in np.unique(mask[valid]) if v}
    return background / total / (1 + len(present))


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_scores(run: Path, timing: dict[str, Any] | None, floor: float) -> dict[str, Any] | None:
    train = read(run / "train" / "metrics.json")
    if not train or timing is None:
        return None
    steps = read(run / "mine" / "metrics.json").get("steps", [])
    labels = read(run / "labels" / "metrics.json")
    no_regions = {"precision": None, "recall": None}  # sup mines nothing
    first = steps[0]["step_regions"] if steps else no_regions
    last = [s["union_regions"] for s in steps if s.get("union_regions")][-1:] or [no_regions]
    warnings = [
        w
        for stage in ("mine", "labels", "train")
        for w in read(run / stage / "metrics.json").get("warnings") or []
    ]
    val = train["without_crf"]["mIoU"]
    one_class = any(ONE_CLASS in w for w in train.get("warnings") or [])
    return {
        "s1P": first["precision"],
        "s1R": first["recall"],
        "uP": last[0]["precision"],
        "uR": last[0]["recall"],
        "pseudo": labels.get("mIoU"),
        "val": val,
        "crf": (train.get("with_crf") or {}).get("mIoU"),
        "time": timing["seconds"],
        "reused": bool(timing.get("reused")),
        "collapsed": val is None or val <= floor + COLLAPSE_MARGIN or one_class,
        "one_class": one_class,
        "floor": floor,
        "warnings": warnings,
    }


def sweep_gain(run: Path, data_root: Path) -> float | None:
    """Union recall minus the step-1 threshold curve's recall at the union's final precision
    (None: the curve never reaches that precision)."""
    config = load_config(PRESET, [f"data.root={data_root}"])
    data = load_dataset(config.data)
    cams = run / "mine" / "step1" / "cams"
    if not cams.is_dir():
        return None
    cache = run / "sweep.json"
    if cache.is_file():
        curve = json.loads(cache.read_text())
    else:
        curve = sweep_step_cams(data, config.data.train_split, cams, THRESHOLDS)
        cache.write_text(json.dumps(curve) + "\n")
    union = union_points(run / "mine" / "metrics.json")[-1]
    target = union["precision"]
    best = None
    for hi, lo in itertools.pairwise(curve):  # precision falls as the threshold falls
        for point in (hi, lo):
            if point["precision"] >= target:
                best = max(best or 0.0, point["recall"])
        if (hi["precision"] - target) * (lo["precision"] - target) < 0:
            w = (hi["precision"] - target) / (hi["precision"] - lo["precision"])
            best = max(best or 0.0, hi["recall"] + w * (lo["recall"] - hi["recall"]))
    return None if best is None else union["recall"] - best


def spread(values: list[float | None], digits: int = 3) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    mean = sum(got) / len(got)
    half = (max(got) - min(got)) / 2
    if digits == 0:
        return f"{mean:.0f}±{half:.0f}" if len(got) > 1 else f"{mean:.0f}"
    return f"{mean:.{digits}f}±{half:.{digits}f}" if len(got) > 1 else f"{mean:.{digits}f}"


def pair(rows: list[dict], p: str, r: str) -> str:
    ps, rs = [x[p] for x in rows], [x[r] for x in rows]
    return f"{spread(ps, 2)} / {spread(rs, 2)}"


COLUMNS = (
    ("variant", 8),
    ("step-1 P / R", 24),
    ("union P / R", 24),
    ("pseudo", 12),
    ("val", 12),
    ("val+CRF", 12),
    ("val/sup", 12),
    ("CRF/sup", 12),
    ("time s", 10),
    ("collapsed", 10),
    ("warned", 8),
)


def of_ceiling(rows: list[dict | None], sup: list[dict | None], key: str) -> list[float | None]:
    """Per seed, `key` (val or crf) of a variant's run as a fraction of sup's (None: either
    is missing, or sup collapsed: no ceiling to measure against)."""
    return [
        a[key] / b[key]
        if a and b and a[key] is not None and b[key] and not b["collapsed"]
        else None
        for a, b in zip(rows, sup, strict=False)
    ]


def print_table(results: dict[Cell, dict[str, list]], seeds: list[int]) -> None:
    header = "".join(f"{name:>{width}}" for name, width in COLUMNS)
    print(f"\nvalues: mean ± half the difference over seeds {seeds}; P / R of regions (train)")
    print("/sup: the variant's val mIoU as a fraction of sup's (trained on the real masks)")
    print("time s*: mine and labels reused from an earlier run (same settings): not in the time")
    for cell, variants in results.items():
        print(f"\n{cell.name}")
        print(header)
        sup = variants.get("sup", [])
        for variant, rows in variants.items():
            if variant == "gain":
                continue
            fractions = {k: of_ceiling(rows, sup, k) for k in ("val", "crf")}
            ok = [row for row in rows if row]
            if not ok:
                print(f"{variant:>8}  not finished")
                continue
            collapsed = sum(row["collapsed"] for row in ok)
            warned = sum(bool(row["warnings"]) for row in ok)
            cells = (
                variant,
                pair(ok, "s1P", "s1R"),
                pair(ok, "uP", "uR"),
                spread([r["pseudo"] for r in ok]),
                spread([r["val"] for r in ok]),
                spread([r["crf"] for r in ok]),
                spread(fractions["val"], 2),
                spread(fractions["crf"], 2),
                spread([r["time"] for r in ok], 0) + ("*" if any(r["reused"] for r in ok) else ""),
                f"{collapsed}/{len(ok)}",
                f"{warned}/{len(ok)}",
            )
            print(
                "".join(f"{text:>{width}}" for text, (_, width) in zip(cells, COLUMNS, strict=True))
            )


def paired(differences: list[float], beat: str, lost: str, neither: str) -> str:
    """A per-seed difference is a finding when it has the same sign in every seed and its mean
    is at least MIN_DIFFERENCE (one point)."""
    mean = sum(differences) / len(differences)
    if len(differences) < 2:
        return neither  # one seed is no finding
    if min(differences) > 0 and mean >= MIN_DIFFERENCE:
        return beat
    if max(differences) < 0 and mean <= -MIN_DIFFERENCE:
        return lost
    return neither


def verdicts(
    results: dict[Cell, dict[str, list]],
    seeds: list[int],
    psl_pair: tuple[str, str],
    left_out: set[str],
) -> None:
    """The table's findings in words; `psl_pair`: the variants (with PSL, without);
    `left_out`: the variants --only dropped (a comparison with one is said not to be made)."""
    print("\nin words (a difference within the seed spread is not a finding):")
    for cell, variants in results.items():
        lines = []
        for variant, runs in variants.items():
            if variant == "gain":
                continue
            rows = [r for r in runs if r]
            bad = [(i, r) for i, r in enumerate(runs) if r and (r["collapsed"] or r["warnings"])]
            for i, row in bad:
                why = []
                if row["val"] is None or row["val"] <= row["floor"] + COLLAPSE_MARGIN:
                    why.append(f"val mIoU {row['val']} at the all-background {row['floor']:.3f}")
                if row["one_class"]:
                    why.append("one class on 95% of the val pixels")
                if row["warnings"]:
                    why.append(f"{len(row['warnings'])} health warning(s)")
                word = "COLLAPSED" if row["collapsed"] else "not healthy"
                lines.append(f"{variant} seed {seeds[i]} {word} ({'; '.join(why)})")
            if rows and not bad:
                lines.append(f"{variant}: healthy")
        sup = variants.get("sup", [])
        for variant, runs in variants.items():
            if variant in ("gain", "sup"):
                continue
            crf = [f for f in of_ceiling(runs, sup, "crf") if f is not None]
            if crf:
                word = "reached" if min(crf) >= TARGET else "did NOT reach"
                values = ", ".join(f"{f:.2f}" for f in crf)
                above = "; above 1: sup is no ceiling here" if max(crf) > 1 else ""
                lines.append(
                    f"{variant} {word} {TARGET:.2f} of the ceiling with CRF in every seed "
                    f"(val mIoU with CRF / sup's per seed: {values}{above})"
                )
        gains = variants.get("gain", [])
        got = [g for g in gains if g is not None]
        if got:
            word = paired(got, "erasing BEAT", "erasing LOST to", "no clear difference to")
            values = ", ".join("n/a" if g is None else f"{g:+.3f}" for g in gains)
            note = "; n/a: no threshold reaches the union's precision" if None in gains else ""
            lines.append(
                f"{word} the best single step-1 threshold at equal precision "
                f"(union recall minus threshold recall per seed: {values}{note})"
            )
        elif gains:
            lines.append("erasing vs threshold: no threshold reaches the union's precision")
        comparisons = (
            (psl_pair, "PSL", "the pseudo labels alone"),
            (("after", "steps1"), "3 erasing steps", "1 step"),
            (("ms1", "steps1"), "multi-scale, flipped step-1 CAMs", "one scale"),
            (("round2", "after"), "a second round", "one round"),
            (("crfrefine", "after"), "the CRF on the pseudo labels (refine)", "none"),
            (("crffill", "after"), "the CRF on the pseudo labels (fill)", "none"),
            (("after", "nofill"), "salient pixels filled from the CAMs", "left unlabelled"),
        )
        for (first, second), name, other in comparisons:
            missing = {first, second} & left_out
            if missing and {first, second} & set(variants):
                lines.append(
                    f"{name} vs {other}: not compared ({', '.join(missing)} not in --only)"
                )
                continue
            # paired by seed: a seed either run lacks is left out
            pairs = zip(variants.get(first, []), variants.get(second, []), strict=False)
            diffs = [a["crf"] - b["crf"] for a, b in pairs if a and b]
            if diffs:
                neither = f"no clear difference between {name} and"
                word = paired(diffs, f"{name} BEAT", f"{name} LOST to", neither)
                values = ", ".join(f"{d:+.3f}" for d in diffs)
                lines.append(f"{word} {other} (val mIoU with CRF per seed: {values})")
        print(f"{cell.name}:")
        for line in lines:
            print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cells", help=f"SIDExCLASSESxOBJECTS:KIND,... (default {DEFAULT_CELLS})")
    parser.add_argument("--sides", help="a product grid instead of --cells: e.g. 64,128,320")
    parser.add_argument("--classes", help="product grid: e.g. 2,5,20 (default 5)")
    parser.add_argument("--objects", help="product grid: at most N per image, e.g. 1,4 (default 2)")
    parser.add_argument("--kinds", help="product grid: synth,real (default synth)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--n", type=int, default=120, help="images per data set (1/4 val)")
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=24,
        help="at least this many images per class: a cell of C classes gets max(n, this x C)",
    )
    parser.add_argument("--epochs-scale", type=float, default=1.0)
    parser.add_argument(
        "--psl-ablation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also train with train.psl the other way round (psl or nopsl): one more training "
        "per run",
    )
    parser.add_argument("--no-before", action="store_true", help="skip the old defaults")
    parser.add_argument(
        "--levers",
        action="store_true",
        help="also steps1 (pseudo labels from after's step-1 CAMs: one erasing step), ms1 (one "
        "step, after's step-1 classifier, CAMs at scales 1, 0.5, 1.5, 2 and flipped), round2 "
        "(retrained on after's CRF-refined predictions of the training images), crfrefine and "
        "crffill (after's regions, labels.crf=refine / fill), nofill (after's regions, "
        "labels.salient_fill=false)",
    )
    parser.add_argument(
        "--only",
        help="run and show only these of the variants the other options name, e.g. sup (the "
        "ceiling of cells whose other variants ran in an earlier pass)",
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--table-only", action="store_true", help="print finished cells only")
    parser.add_argument("--quick", action="store_true", help=f"smoke setting: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.seeds, args.n, args.epochs_scale, args.images_per_class = QUICK.values()
    if any((args.sides, args.classes, args.objects, args.kinds)):
        cells = [
            Cell(side, classes, objects, kind)
            for kind in (args.kinds or "synth").split(",")
            for side in ints(args.sides or "128")
            for classes in ints(args.classes or "5")
            for objects in ints(args.objects or "2")
        ]
    else:
        cells = parse_cells(args.cells or DEFAULT_CELLS)
    seeds = ints(args.seeds)
    preset = load_config(PRESET, ["data.root=."])
    variants = ["sup", "after"] + ([] if args.no_before else ["before"])

    def lengths(variant: str) -> str:
        overrides = variant_overrides(variant, args.epochs_scale, preset, Path("DATA"))
        return " ".join(
            o for o in overrides if any(k in o for k in ("epochs", "iterations", "positives"))
        )

    # the PSL ablation flips the preset's train.psl; psl_pair: (with PSL, without)
    ablation, psl_pair = (
        ("nopsl", ("after", "nopsl")) if preset.train.psl else ("psl", ("psl", "after"))
    )
    variants += [ablation] if args.psl_ablation else []
    variants += list(LEVERS) if args.levers else []
    left_out: set[str] = set()
    if args.only:
        only = args.only.split(",")
        if unknown := set(only) - set(variants):
            raise SystemExit(f"--only: {sorted(unknown)} not among this grid's {variants}")
        left_out = set(variants) - set(only)
        variants = [v for v in variants if v in only]
    print(
        f"preset {PRESET.name}; {len(cells)} cell(s) x seeds {seeds} x {variants}; "
        f"n=max({args.n}, {args.images_per_class} x classes); lengths x{args.epochs_scale:g}: "
        f"after {lengths('after')}; before {lengths('before')}"
    )
    results: dict[Cell, dict[str, list]] = {}
    for cell in cells:
        results[cell] = {v: [] for v in variants} | {"gain": []}
        for seed in seeds:
            base = args.out / cell.name / f"seed{seed}"
            if args.table_only and not (base / "data" / "splits" / "val.txt").is_file():
                continue
            data = make_data(
                cell, seed, max(args.n, args.images_per_class * cell.classes), base / "data"
            )
            floor = all_background_miou(data)
            for variant in variants:
                run = base / variant
                if variant == ablation and not args.table_only:  # --table-only writes nothing
                    copy_stages(base / "after", run)
                if variant in LABEL_LEVERS and not args.table_only:
                    copy_stages(base / "after", run, ("mine", "saliency"))
                overrides = [f"seed={seed}"]
                overrides += variant_overrides(variant, args.epochs_scale, preset, data)
                if variant == "ms1" and not args.table_only:
                    config = load_config(PRESET, [f"data.root={data}", *overrides])
                    copy_step1_classifier(base / "after", run, config)
                after_done = (base / "after" / "train" / "metrics.json").is_file()
                if variant in LEVERS and not after_done:
                    timing = None  # built on after's outputs: run again once after finished
                elif args.table_only:
                    ready = variant != "round2" or (base / ROUND2_LABELS / "done").is_file()
                    digests = expected_digests(data, overrides) if ready else {}
                    timing = finished_timing(run, digests["train"]) if ready else None
                else:
                    if variant == "round2":
                        after = variant_overrides("after", args.epochs_scale, preset, data)
                        round2_labels(base, data, [f"seed={seed}", *after])
                    print(f"{cell.name} seed {seed} {variant} ...", flush=True)
                    timing = run_variant(run, data, overrides, args.threads)
                results[cell][variant].append(run_scores(run, timing, floor))
            after = base / "after"
            if (after / "train" / "metrics.json").is_file():
                results[cell]["gain"].append(sweep_gain(after, data))
    print_table(results, seeds)
    verdicts(results, seeds, psl_pair, left_out)


if __name__ == "__main__":
    main()
