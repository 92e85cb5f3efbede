"""`aepsl labels`: fuse the mined regions with background from saliency into pseudo labels.

Reads OUT/mine/regions/<id>.png; writes OUT/labels/<id>.png (VOC palette, 255 = ignore),
OUT/labels/vis/<id>.png overlays, OUT/labels/metrics.json when ground truth exists, and caches
built-in saliency maps in OUT/saliency/<id>.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from aepsl.config import Config
from aepsl.data.datasets import Dataset, Sample, load_dataset, load_image
from aepsl.errors import UserError
from aepsl.evaluation import evaluate_folder
from aepsl.io import (
    PALETTE,
    claim_folder,
    mark_complete,
    read_gray_png,
    read_index_png,
    settings_digest,
    write_index_png,
    write_json,
    write_png,
)
from aepsl.labels.fusion import background_from_cams, background_from_saliency, fuse_pseudo_label
from aepsl.labels.saliency import mbd_saliency
from aepsl.mine.stage import settings_hash as mine_settings_hash


def settings_hash(config: Config) -> str:
    """Hash of every setting that changes the pseudo labels, the mined regions' included."""
    return settings_digest(
        {
            "mine": mine_settings_hash(config),
            "saliency": config.saliency.model_dump(),
            "labels": config.labels.model_dump(exclude={"visualise"}),
        }
    )


def run_labels(config: Config, out: Path) -> dict[str, Any]:
    """Write (or resume, or skip when finished) the pseudo labels; returns their metrics."""
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    train = data.split(config.data.train_split)
    regions_dir = out / "mine" / "regions"
    labels_dir = out / "labels"
    digest = settings_hash(config)
    if claim_folder(labels_dir, digest):
        print(f"labels: finished for these settings in {labels_dir}; skipped")
        return json.loads((labels_dir / "metrics.json").read_text())
    if config.saliency.source == "builtin":
        claim_folder(out / "saliency", _saliency_cache_hash(config))
    last_cams = _last_step_cams(config, out)
    vis_ids = {s.id for s in train[: config.labels.visualise]}
    for sample in tqdm(train, desc="labels", unit="img", dynamic_ncols=True):
        path = regions_dir / f"{sample.id}.png"
        if not path.is_file():
            raise UserError(
                f"{path}: mined regions missing; run `aepsl mine` with this --out first"
            )
        target = labels_dir / f"{sample.id}.png"
        if target.is_file() and sample.id not in vis_ids:
            continue  # written before an interruption, with these settings
        regions = read_index_png(path)
        background, saliency = _background(config, data, sample, regions.shape, out, last_cams)
        labels = fuse_pseudo_label(regions, background, config.labels.low_saliency)
        write_index_png(target, labels)
        if sample.id in vis_ids:
            write_png(labels_dir / "vis" / f"{sample.id}.png", _overlay(sample, saliency, labels))
    metrics: dict[str, Any] = {
        "saliency_source": config.saliency.source,
        "bg_threshold": config.labels.bg_threshold,
        "low_saliency": config.labels.low_saliency,
    }
    if train and all(s.mask is not None for s in train):
        metrics.update(evaluate_folder(labels_dir, train, data.classes, "exclude"))
    write_json(labels_dir / "metrics.json", metrics)
    if metrics.get("mIoU") is not None:
        print(
            f"pseudo labels: mIoU {metrics['mIoU']:.3f} over labelled pixels, "
            f"{metrics['labelled_fraction']:.1%} of pixels labelled"
        )
    mark_complete(labels_dir, digest)
    return metrics


def _saliency_cache_hash(config: Config) -> str:
    data = config.data.model_dump(include={"format", "root", "train_split"})
    return settings_digest({"data": data, "max_side": config.saliency.max_side})


def _last_step_cams(config: Config, out: Path) -> Path | None:
    if config.saliency.source != "none":
        return None
    steps = sorted(out.glob("mine/step*/cams"), key=lambda p: int(p.parent.name[4:]))
    if not steps:
        raise UserError(
            f"{out / 'mine'}: saliency.source=none needs the CAMs; run `aepsl mine` with "
            "mine.save_cams=true"
        )
    return steps[-1]


def _background(
    config: Config,
    data: Dataset,
    sample: Sample,
    shape: tuple[int, int],
    out: Path,
    cams_dir: Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(background mask, the map it came from in [0, 1]) for one image."""
    if cams_dir is not None:
        cams = np.load(cams_dir / f"{sample.id}.npz", allow_pickle=False)["cams"].astype(np.float32)
        score = cams.max(axis=0) if len(cams) else np.zeros(shape, np.float32)
        return background_from_cams(cams, config.labels.cam_bg_threshold), score
    saliency = _saliency(config, sample, out)
    if saliency.shape != shape:
        raise UserError(
            f"saliency map for '{sample.id}' is {saliency.shape[1]}x{saliency.shape[0]}, "
            f"its image {shape[1]}x{shape[0]}"
        )
    return background_from_saliency(saliency, config.labels.bg_threshold), saliency


def _saliency(config: Config, sample: Sample, out: Path) -> np.ndarray:
    if config.saliency.source == "dir":
        path = (
            Path(config.saliency.dir) / f"{sample.id}.png"
            if config.saliency.dir
            else sample.saliency
        )
        if path is None or not path.is_file():
            where = path or f"{sample.image.parent.parent / 'saliency' / sample.id}.png"
            raise UserError(f"{where}: saliency map missing (saliency.source=dir)")
        return read_gray_png(path)
    cache = out / "saliency" / f"{sample.id}.png"
    if cache.is_file():
        return read_gray_png(cache)
    saliency = mbd_saliency(load_image(sample), max_side=config.saliency.max_side)
    write_png(cache, (saliency * 255 + 0.5).astype(np.uint8))
    return read_gray_png(cache)  # the cached 8-bit map, so a re-run sees identical values


def _overlay(sample: Sample, saliency: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Image | saliency | pseudo label over the image (ignored pixels in white)."""
    rgb = load_image(sample)
    sal = np.repeat((saliency * 255).astype(np.uint8)[..., None], 3, axis=2)
    colours = np.array(PALETTE, np.uint8).reshape(256, 3)[labels]
    colours[labels == 255] = 255
    blend = (0.35 * rgb + 0.65 * colours).astype(np.uint8)
    return np.concatenate([rgb, sal, blend], axis=1)
