"""`aepsl labels`: fuse the mined regions with background from saliency into pseudo labels.

Reads OUT/mine/regions/<id>.png; writes OUT/labels/<id>.png (VOC palette, 255 = ignore),
OUT/labels/vis/<id>.png overlays, OUT/labels/metrics.json when ground truth exists, and caches
built-in saliency maps in OUT/saliency/<id>.png (layout.py).

Made elsewhere (external.py): with labels.cams_dir the regions are thresholded from that folder's
CAMs instead of read from OUT/mine; with labels.dir nothing is built: that folder of pseudo
labels is checked and scored, and `train` reads it.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from aepsl.config import Config
from aepsl.data.datasets import (
    Dataset,
    Sample,
    image_size,
    load_dataset,
    load_image,
    scored_samples,
)
from aepsl.errors import UserError
from aepsl.evaluation import evaluate_folder
from aepsl.external import check_pseudo_labels, image_cams, most_image_cams
from aepsl.health import check_folder
from aepsl.inference.crf_params import CrfParams
from aepsl.inference.meanfield import mean_field_labels
from aepsl.io import (
    read_gray_png,
    read_index_png,
    read_json,
    write_index_png,
    write_json,
    write_png,
)
from aepsl.labelmap import CONFLICT, IGNORE, colourise
from aepsl.labels.fusion import (
    background_from_cams,
    background_from_saliency,
    fill_from_cams,
    fuse_pseudo_label,
    label_probabilities,
    merge_crf_label,
)
from aepsl.labels.saliency import mbd_saliency
from aepsl.layout import RunLayout, claim_folder, saliency_cache_digest
from aepsl.regions import cams_to_regions
from aepsl.runtime import labels_workers
from aepsl.workers import ctrl_c_ignored, worker_setup


def run_labels(config: Config, out: Path) -> dict[str, Any]:
    """Write (or resume, or skip when finished) the pseudo labels; returns their metrics."""
    data = load_dataset(config.data)
    train = data.training_split(config.data.train_split)
    run = RunLayout(out, config)
    if config.labels.dir:  # pseudo labels made elsewhere: checked and scored, not built
        return _external_labels(config, data, train, run)
    run.check_input("mine")
    required = [run.labels_metrics, *(run.pseudo_label(s.id) for s in train)]
    if run.finished("labels", required):
        return read_json(run.labels_metrics, run.redo("labels"))
    if config.saliency.source == "builtin":
        claim_folder(run.saliency, saliency_cache_digest(config))
    last_cams = _last_step_cams(config, run)
    fill_cams = _fill_cams(config, run)
    vis_ids = {s.id for s in train[: config.labels.visualise]}
    # written before an interruption with these settings: kept (overlays are redone)
    todo = [s for s in train if s.id in vis_ids or not run.pseudo_label(s.id).is_file()]
    job = functools.partial(
        _label_image, run, data.num_classes, last_cams, fill_cams, frozenset(vis_ids)
    )
    workers = min(labels_workers(config, len(todo)), len(todo))
    bar = tqdm(total=len(todo), desc="labels", unit="img", dynamic_ncols=True)
    try:
        if workers <= 1:
            for sample in todo:
                job(sample)
                bar.update()
        else:
            _in_workers(job, todo, workers, config.data.max_pixels, bar)
    finally:
        bar.close()
    metrics: dict[str, Any] = {
        "regions": config.labels.cams_dir or "mine/regions",  # relative to the run folder
        "saliency_source": config.saliency.source,
        "bg_threshold": config.labels.bg_threshold,
        "low_saliency": config.labels.low_saliency,
        "crf": config.labels.crf,
    }
    if config.labels.salient_fill:
        metrics["salient_fill"] = {"threshold": config.labels.fill_threshold}
    if config.labels.crf != "none":
        metrics["crf_confidence"] = config.labels.crf_confidence
    metrics.update(_scores(run.labels, train, data, config))
    write_json(run.labels_metrics, metrics)
    if metrics.get("mIoU") is not None:
        print(_score_line(metrics))
    run.mark_complete("labels")
    return metrics


def _in_workers(
    job: Callable[[Sample], None], todo: list[Sample], workers: int, max_pixels: int, bar: tqdm
) -> None:
    """`job` on every sample in a pool of `workers` spawned processes. On an error or Ctrl-C the
    images not started are dropped and those started finish (no half-written file); a worker
    that died is a one-line error."""
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, worker_setup, (True, max_pixels))
    try:
        with ctrl_c_ignored():  # the workers start on the first submissions
            futures = [pool.submit(job, sample) for sample in todo]
        for future in as_completed(futures):
            future.result()  # a worker's UserError is raised here as it was
            bar.update()
    except BrokenProcessPool:
        raise UserError(
            "labels: a worker process died (out of memory?); run again to resume, with "
            "labels.workers=1 to label in this process"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _label_image(
    run: RunLayout,
    num_classes: int,
    last_cams: Path | None,
    fill_cams: list[Path],
    vis_ids: frozenset[str],
    sample: Sample,
) -> None:
    """One image's pseudo label (and overlay): its regions fused with its background."""
    config = run.config
    path = run.union_region(sample.id)
    if not config.labels.cams_dir and not path.is_file():
        raise UserError(f"{path}: mined regions missing; run `aepsl mine` with this --out first")
    if config.labels.cams_dir:  # one step of regions, thresholded as mine does
        shape = image_size(sample.image)
        own = image_cams(config.labels.cams_dir, sample, num_classes, shape)
        regions = cams_to_regions(
            torch.from_numpy(own),
            list(sample.labels),
            config.mine.threshold_mode,
            config.mine.threshold,
        ).numpy()
    else:
        regions = read_index_png(path)
        _check_regions(path, regions, sample)
    cams = None
    if last_cams is not None:
        cams = image_cams(last_cams, sample, num_classes, regions.shape)
    background, saliency = _background(config, sample, regions.shape, run, cams)
    labels = fuse_pseudo_label(regions, background, config.labels.low_saliency)
    if fill_cams:
        most = most_image_cams(fill_cams, sample, num_classes, regions.shape)
        labels = fill_from_cams(
            labels, most, list(sample.labels), background, config.labels.fill_threshold
        )
    if config.labels.crf != "none":
        labels = _crf_label(config, sample, labels)
    write_index_png(run.pseudo_label(sample.id), labels)
    if sample.id in vis_ids:
        write_png(run.labels_vis / f"{sample.id}.png", _overlay(sample, saliency, labels))


def _check_regions(path: Path, regions: np.ndarray, sample: Sample) -> None:
    """Mined regions that do not fit their image (its size, its tags): a one-line error."""
    height, width = image_size(sample.image)
    if regions.shape != (height, width):
        raise UserError(
            f"{path}: mined regions are {regions.shape[1]}x{regions.shape[0]} but the image is "
            f"{width}x{height}; run `aepsl mine` again with this --out"
        )
    stray = np.setdiff1d(np.unique(regions), [0, *sample.labels, CONFLICT])
    if stray.size:
        raise UserError(
            f"{path}: mined regions of classes {stray.tolist()} that the image is not tagged "
            "with (were its tags changed?); run `aepsl mine` again with this --out"
        )


def _crf_label(config: Config, sample: Sample, labels: np.ndarray) -> np.ndarray:
    """labels.crf: the pseudo label's edges moved to the image's by a dense CRF over the
    background and the image's tags (the torch mean field on the CPU, in this process). A
    label without a labelled pixel, or an image without tags, is left as it is."""
    classes = [0, *sorted(sample.labels)]
    if len(classes) < 2 or (labels == IGNORE).all():
        return labels
    probs = label_probabilities(labels, classes, config.labels.crf_confidence)
    image = load_image(sample)
    (index,) = mean_field_labels([image], [probs], CrfParams.from_config(config.crf), "cpu")
    return merge_crf_label(labels, index.numpy(), classes, config.labels.crf == "fill")


def _score_line(metrics: dict[str, Any]) -> str:
    scored = metrics["scored"]
    return (
        f"pseudo labels on split '{scored['split']}' ({scored['images']} images): mIoU "
        f"{metrics['mIoU']:.3f} over labelled pixels ({metrics['labelled_fraction']:.1%} of "
        f"pixels labelled), {metrics['unlabelled_as_background']['mIoU']:.3f} with unlabelled "
        "pixels as background"
    )


def _external_labels(
    config: Config, data: Dataset, train: list[Sample], run: RunLayout
) -> dict[str, Any]:
    """labels.dir: check the folder as train will read it (one line for all its faults), score
    it when the split has masks, and say in one line that nothing was built."""
    folder = Path(config.labels.dir)
    if run.finished("labels", [run.labels_metrics]):
        return read_json(run.labels_metrics, run.redo("labels"))
    check_pseudo_labels(folder, train, data.num_classes)
    metrics: dict[str, Any] = {"source": str(folder), **_scores(folder, train, data, config)}
    write_json(run.labels_metrics, metrics)
    score = (
        f", mIoU {metrics['mIoU']:.3f} over labelled pixels ({metrics['labelled_fraction']:.1%} "
        "labelled)"
        if metrics.get("mIoU") is not None
        else ""
    )
    print(
        f"labels: not built: labels.dir is set; train reads the {len(train)} pseudo labels "
        f"in {folder} (checked{score})"
    )
    run.mark_complete("labels")
    return metrics


def _scores(folder: Path, train: list[Sample], data: Dataset, config: Config) -> dict[str, Any]:
    """The pseudo labels in `folder` scored against the masks of the scored images
    (data.score_split) when every one has a mask (over labelled pixels, and with unlabelled
    pixels as background: what most papers print), and the health warnings of all of them."""
    split, scored = scored_samples(data, config.data)
    scores: dict[str, Any] = {"scored": {"split": split, "images": len(scored)}}
    if scored and all(s.mask is not None for s in scored):
        scores.update(evaluate_folder(folder, scored, data.classes, "exclude"))
        scores["unlabelled_as_background"] = evaluate_folder(
            folder, scored, data.classes, "background"
        )
    scores["warnings"] = check_folder(folder, train, data.classes, "labels", "pseudo labels")
    return scores


def _last_step_cams(config: Config, run: RunLayout) -> Path | None:
    """The CAMs saliency.source=none takes its background from: labels.cams_dir, or the last
    mining step's saved CAMs (step 1's external ones when only that step has any)."""
    if config.saliency.source != "none":
        return None
    if config.labels.cams_dir:
        return Path(config.labels.cams_dir)
    steps = [run.step(s).cams for s in run.steps_on_disk() if run.step(s).cams.is_dir()]
    if not steps and config.mine.step1_cams:
        return Path(config.mine.step1_cams)
    if not steps:
        raise UserError(
            f"{run.mine}: saliency.source=none needs the CAMs; run `aepsl mine` with "
            "mine.save_cams=true"
        )
    return steps[-1]


def _fill_cams(config: Config, run: RunLayout) -> list[Path]:
    """The CAM folders labels.salient_fill reads: labels.cams_dir, or the saved CAMs of each
    mining step the union used (mining keeps them when salient_fill is set; a step
    mine.auto_stop stopped has none); none without salient_fill."""
    if not config.labels.salient_fill:
        return []
    if config.labels.cams_dir:
        return [Path(config.labels.cams_dir)]
    used = read_json(run.mine_metrics, run.redo("mine")).get("steps_used", [])
    folders = [run.step(s).cams for s in used]
    if config.mine.step1_cams and 1 in used and not folders[0].is_dir():
        folders[0] = Path(config.mine.step1_cams)  # step 1's CAMs were made elsewhere
    missing = [folder for folder in folders if not folder.is_dir()]
    if missing or not folders:
        raise UserError(
            f"{missing[0] if missing else run.mine_metrics}: labels.salient_fill needs the "
            f"CAMs of every mining step used; {run.redo('mine')}"
        )
    return folders


def _background(
    config: Config,
    sample: Sample,
    shape: tuple[int, int],
    run: RunLayout,
    cams: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(background mask, the map it came from in [0, 1]) for one image; `cams`: its classes'
    CAMs, for saliency.source=none."""
    if cams is not None:
        score = cams.max(axis=0) if len(cams) else np.zeros(shape, np.float32)
        return background_from_cams(cams, config.labels.cam_bg_threshold), score
    saliency = _saliency(config, sample, run)
    if saliency.shape != shape:
        raise UserError(
            str(  # the file it came from, as _saliency found it
                run.saliency_map(sample.id)
                if config.saliency.source != "dir"
                else Path(config.saliency.dir) / f"{sample.id}.png"
                if config.saliency.dir
                else sample.saliency
            )
            + f": saliency map is {saliency.shape[1]}x{saliency.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]}"
        )
    return background_from_saliency(saliency, config.labels.bg_threshold), saliency


def _saliency(config: Config, sample: Sample, run: RunLayout) -> np.ndarray:
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
    cache = run.saliency_map(sample.id)
    if cache.is_file():
        return read_gray_png(cache)
    saliency = mbd_saliency(load_image(sample), max_side=config.saliency.max_side)
    write_png(cache, (saliency * 255 + 0.5).astype(np.uint8))
    return read_gray_png(cache)  # the cached 8-bit map, so a re-run sees identical values


def _overlay(sample: Sample, saliency: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Image | saliency | pseudo label over the image (ignored pixels in white)."""
    rgb = load_image(sample)
    sal = np.repeat((saliency * 255).astype(np.uint8)[..., None], 3, axis=2)
    colours = colourise(labels)
    colours[labels == 255] = 255
    blend = (0.35 * rgb + 0.65 * colours).astype(np.uint8)
    return np.concatenate([rgb, sal, blend], axis=1)
