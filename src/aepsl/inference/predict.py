"""Prediction with the trained segmentation network: scores at image size (optionally averaged
over scales and flips, optionally weighted by the classification branch), argmax, dense CRF.

CRF runs in worker processes on chunks of images while the main process runs the network, so
memory holds one chunk of probability maps at a time whatever the split's size.

Under `torchrun` each process predicts its share of the images (disjoint files), and the
scores are summed over the processes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from aepsl.config import Config
from aepsl.data.datasets import IMAGE_EXTENSIONS, Sample, check_id, load_dataset, load_image
from aepsl.errors import UserError
from aepsl.evaluation import evaluate_folder
from aepsl.health import PSL_CAUSE, check_folder
from aepsl.inference.crf import (
    crf_job,
    crf_labels_torch,
    crf_pool,
    dense_crf,
    pydensecrf_installed,
    resolve_backend,
)
from aepsl.inference.crf_params import CrfParams
from aepsl.io import (
    atomic_path,
    read_json,
    write_index_png,
    write_json,
    write_png,
)
from aepsl.labelmap import colourise
from aepsl.layout import (
    RunLayout,
    check_out,
    claim_folder,
    mark_complete,
    prediction_digest,
    refuse_inputs_inside,
    run_lock,
    writable_out,
)
from aepsl.models.saved import check_class_names
from aepsl.models.segnet import SegNet, input_scale, load_segnet
from aepsl.record import save_config
from aepsl.runtime import (
    autocast,
    barrier,
    crf_workers,
    is_main,
    on_main,
    prepare_model,
    rank,
    select_device,
    to_device,
    world_size,
)

# The VOC evaluation server's layout of segmentation results (comp6: trained on data other
# than VOC's own segmentation masks, which is what weak supervision is), and the archive of it.
VOC_TEST_LAYOUT = Path("results") / "VOC2012" / "Segmentation" / "comp6_test_cls"
VOC_TEST_ARCHIVE = "results.tgz"
CHUNK = 8


def images_in(folder: Path) -> list[Sample]:
    """Every image of a folder as an unlabelled sample (id = file name without extension)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise UserError(f"{folder}: no .jpg, .jpeg or .png images")
    ids = [check_id(p.stem, str(p)) for p in paths]
    seen: set[str] = set()
    for i in ids:  # one pass: a folder may hold a million images
        if i in seen:
            raise UserError(f"{folder}: two images share the id '{i}'")
        seen.add(i)
    return [Sample(i, p, ()) for i, p in zip(ids, paths, strict=True)]


@torch.no_grad()
def predict_probs(
    model: SegNet, image: np.ndarray, config: Config, device: torch.device
) -> np.ndarray:
    """(C+1, H, W) float32 class probabilities of an (H, W, 3) uint8 image."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)  # the network normalises
    batch = to_device(tensor[None], config, device)
    size = image.shape[:2]
    # The image is scaled as in training (the model file records how; other modules than
    # SegNet: not at all), then by each scale.
    size_limits = getattr(model, "input_size", 0), getattr(model, "input_min_side", 0)
    base = input_scale(*size, *size_limits)
    probs, nus = 0.0, []
    runs = 0
    for scale in config.predict.scales:
        factor = base * scale
        scaled = (
            batch
            if factor == 1
            else F.interpolate(batch, scale_factor=factor, mode="bilinear", align_corners=False)
        )
        for flip in [False, True] if config.predict.flip else [False]:
            with autocast(config, device):
                scores, class_logits = model(scaled.flip(-1) if flip else scaled)
            scores = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
            scores = scores.flip(-1) if flip else scores
            probs = probs + scores.softmax(dim=1)[0]
            nus.append(torch.sigmoid(class_logits.float())[0])
            runs += 1
    probs = probs / runs
    if config.predict.weight_by_classifier:
        nu = torch.stack(nus).mean(0)
        weights = torch.cat([torch.ones(1, device=nu.device), nu])
        probs = probs * weights[:, None, None]
        probs = probs / probs.sum(0, keepdim=True).clamp(min=1e-12)
    return probs.cpu().numpy().astype(np.float32)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    colours = colourise(labels)
    return np.where(labels[..., None] > 0, 0.45 * image + 0.55 * colours, image).astype(np.uint8)


def _chunks(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def crf_available(config: Config | None = None) -> bool:
    """Whether the CRF can run with `crf.backend` (default auto): the torch backend always can,
    pydensecrf needs the 'crf' extra."""
    backend = "auto" if config is None else config.crf.backend
    return backend != "pydensecrf" or pydensecrf_installed()


def predict_samples(
    model: SegNet,
    samples: list[Sample],
    config: Config,
    device: torch.device,
    plain_dir: Path | None,
    crf_dir: Path | None,
    sharded: bool = False,
) -> None:
    """Write `<id>.png` index maps to `plain_dir` (argmax) and/or `crf_dir` (after dense CRF),
    with colour overlays in `<dir>/overlay/` when `predict.overlays` is set.

    sharded=True: in a distributed run every rank calls this, writes its share of `samples`
    (disjoint files) and waits for the others; otherwise no collective is involved."""
    backend = resolve_backend(config.crf.backend, device)
    if crf_dir is not None and backend == "pydensecrf":
        dense_crf(
            np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 2), 0.5, np.float32)
        )  # fails early with the install hint
    model.eval()
    todo = [
        s
        for s in (samples[rank() :: world_size()] if sharded else samples)
        if (plain_dir and not (plain_dir / f"{s.id}.png").is_file())
        or (crf_dir and not (crf_dir / f"{s.id}.png").is_file())
    ]
    pool = None  # CRF on the CPU: one image per process (torch with one thread each)
    workers = crf_workers(config)
    in_process = backend == "torch" and (device.type != "cpu" or workers == 1)
    if crf_dir is not None and not in_process and workers > 1:
        pool = crf_pool(backend, workers)
    params = CrfParams.from_config(config.crf)
    refine = crf_job(backend, params)
    bar = tqdm(
        total=len(todo), desc="predict", unit="img", dynamic_ncols=True, disable=not is_main()
    )
    try:
        for chunk in _chunks(todo, CHUNK):
            images = [load_image(s) for s in chunk]
            probs = [predict_probs(model, image, config, device) for image in images]
            if plain_dir is not None:
                for sample, image, prob in zip(chunk, images, probs, strict=True):
                    _write(plain_dir, sample.id, image, prob.argmax(0).astype(np.uint8), config)
            if crf_dir is not None and in_process:  # GPU (batched), or crf.workers=1
                refined = crf_labels_torch(images, probs, device, params=params)
            elif crf_dir is not None:
                jobs = list(zip(images, probs, strict=True))
                refined = pool.map(refine, jobs) if pool else [refine(job) for job in jobs]
            if crf_dir is not None:
                for sample, image, labels in zip(chunk, images, refined, strict=True):
                    _write(crf_dir, sample.id, image, labels, config)
            bar.update(len(chunk))
    except BaseException:
        if pool is not None:  # Ctrl-C or an error: the workers' queued images are dropped
            pool.terminate()
        raise
    finally:
        bar.close()  # before any error line, so it starts a line of its own
        if pool is not None:
            pool.close()
            pool.join()
    if sharded:
        barrier()


def _write(
    folder: Path, image_id: str, image: np.ndarray, labels: np.ndarray, config: Config
) -> None:
    if config.predict.overlays:
        write_png(folder / "overlay" / f"{image_id}.png", overlay(image, labels))
    write_index_png(folder / f"{image_id}.png", labels)  # last: marks the image done


def write_voc_archive(out: Path, ids: list[str]) -> Path:
    """OUT/results.tgz for the VOC evaluation server: `results/VOC2012/Segmentation/
    comp6_test_cls/<id>.png` of every id in `ids` (read from OUT/VOC_TEST_LAYOUT) and nothing
    else, owner and group anonymised; written to a temporary name and renamed, so the archive
    beside the folder is complete or absent."""
    folder = out / VOC_TEST_LAYOUT
    missing = [i for i in ids if not (folder / f"{i}.png").is_file()]
    if missing:
        raise UserError(
            f"{folder}: {len(missing)} of {len(ids)} predictions missing (e.g. {missing[0]}.png)"
        )

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    path = out / VOC_TEST_ARCHIVE
    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for image_id in sorted(ids):
            name = (VOC_TEST_LAYOUT / f"{image_id}.png").as_posix()
            tar.add(folder / f"{image_id}.png", arcname=name, filter=anonymous)
    return path


def evaluate_trained(config: Config, out: Path, model: SegNet, device: torch.device) -> dict:
    """Predict the val split without and with CRF into OUT/predict and OUT/predict_crf, score
    both, and write OUT/train/metrics.json."""
    run = RunLayout(out, config)
    data = load_dataset(config.data)
    split = config.data.val_split
    result: dict = {"split": split}
    if not data.has_split(split) or any(s.mask is None for s in data.split(split)):
        result["note"] = f"split '{split}' is missing or lacks ground truth: nothing scored"
        on_main(write_json, run.train_metrics, result)
        return result
    samples = data.split(split)
    digest = prediction_digest(run.model, config, crf=True)
    plain, refined = run.predict, run.predict_crf
    use_crf = crf_available(config)
    metrics_path = run.train_metrics

    def claim() -> bool:
        finished = claim_folder(plain, digest)
        if use_crf:
            finished = claim_folder(refined, digest) and finished
        return finished and metrics_path.is_file()

    if on_main(claim):
        print(f"predict: {split} predicted and scored for this model in {plain}; skipped")
        return read_json(metrics_path, f"delete the folder {run.predict} and run the stage again")
    predict_samples(
        model, samples, config, device, plain, refined if use_crf else None, sharded=True
    )
    share = samples[rank() :: world_size()]
    also = PSL_CAUSE if config.train.psl else ""
    result["warnings"] = on_main(
        check_folder, plain, samples, data.classes, "train", "val predictions", also=also
    )
    result["without_crf"] = evaluate_folder(plain, share, data.classes, sharded=True)
    if use_crf:
        result["with_crf"] = evaluate_folder(refined, share, data.classes, sharded=True)
    else:
        result["with_crf"] = None
        result["note"] = "pydensecrf is not installed (pip install 'aepsl[crf]'): no CRF score"
    if is_main():
        write_json(metrics_path, result)
        mark_complete(plain, digest)
        if use_crf:
            mark_complete(refined, digest)
    barrier()
    return result


def predict_report_images(config: Config, out: Path, model: SegNet, device: torch.device) -> None:
    """Predict the training images `mine` drew (the report's samples) with the trained network
    into OUT/report/predict and, when the CRF can run, OUT/report/predict_crf. Files there for
    the same model and settings are kept; anything else is redone."""
    run = RunLayout(out, config)
    data = load_dataset(config.data)
    ids = run.drawn_ids()
    samples = [s for s in data.split(config.data.train_split) if s.id in ids]
    if not samples:
        return
    config = config.model_copy(deep=True)
    config.predict.overlays = False  # the report embeds its own pictures
    digest = prediction_digest(run.model, config, crf=True)
    crf = run.report_predict_crf if crf_available(config) else None
    for folder in (run.report_predict, crf):
        if folder is not None:
            claim_folder(folder, digest)
    predict_samples(model, samples, config, device, run.report_predict, crf)


@dataclass(frozen=True)
class PredictJob:
    """What `aepsl predict` is asked: the model file, the output folder, the images (a split of
    the configured dataset, or a folder), CRF or not, and the output format (`png`, or
    `voc-test` for the VOC evaluation server)."""

    checkpoint: Path
    out: Path
    split: str | None = None
    images: Path | None = None
    crf: bool = False
    format: Literal["png", "voc-test"] = "png"


def run_predict(config: Config, job: PredictJob) -> dict[str, Any]:
    """Segment a split or a folder of images with a trained network into `job.out` (resuming:
    predictions there made by this model file with these settings are kept); returns what was
    written: the folder, counts, collapse warnings (also in OUT/health.json) and, for voc-test,
    the archive."""
    if (job.split is None) == (job.images is None):
        raise UserError("give exactly one of --split NAME or --images DIR")
    voc_test = job.format == "voc-test"
    if voc_test:  # the server's folder holds index PNGs only
        config = config.model_copy(deep=True)
        config.predict.overlays = False
    model = load_segnet(job.checkpoint, config)  # built as the file says
    samples, names = _predict_samples_of(config, job, model)
    check_out(job.out, config)
    if job.images and job.out.resolve() == job.images.resolve():
        raise UserError(f"{job.out}: --out is the --images folder; write predictions elsewhere")
    if job.images:
        refuse_inputs_inside(job.out, {"--images": job.images})
    model = prepare_model(model, config, select_device(config))  # before --out is created
    out = writable_out(job.out)
    with run_lock(out):
        return _predict_into(out, config, job, model, samples, names)


def _predict_into(
    out: Path,
    config: Config,
    job: PredictJob,
    model: SegNet,
    samples: list[Sample],
    names: list[str],
) -> dict[str, Any]:
    """run_predict's work, in the held output folder."""
    voc_test = job.format == "voc-test"
    device = select_device(config)  # the one prepare_model put the model on
    target = out / VOC_TEST_LAYOUT if voc_test else out
    # Predictions already in the folder count only if this checkpoint and these settings made
    # them (the folder's manifest); others are redone.
    digest = prediction_digest(job.checkpoint, config, job.crf)
    on_main(_claim_predictions, out, target, digest)
    save_config(config, out)
    before = sum((target / f"{s.id}.png").is_file() for s in samples)
    plain, refined = (None, target) if job.crf else (target, None)
    predict_samples(model, samples, config, device, plain, refined, sharded=True)
    # a class of the split's image labels never predicted, or one class nearly everywhere
    found = on_main(check_folder, target, samples, names, "predict", "predictions")
    on_main(write_json, out / "health.json", {"images": len(samples), "warnings": found})
    on_main(mark_complete, out, digest)
    kept = f" ({before} already there for this checkpoint and settings)" if before else ""
    print(f"wrote {len(samples) - before} predictions to {target}{kept}")
    result = {"folder": target, "written": len(samples) - before, "kept": before}
    result["warnings"] = found
    if voc_test and is_main():
        result["archive"] = write_voc_archive(out, [s.id for s in samples])
        print(f"wrote {result['archive']}: upload it to the VOC evaluation server")
    return result


def _predict_samples_of(
    config: Config, job: PredictJob, model: SegNet
) -> tuple[list[Sample], list[str]]:
    """The samples `job` names and the class names (the model file's, or numbered, for a
    folder of images), checked against the network's classes."""
    classes = model.classifier.out_channels - 1
    saved = getattr(model, "class_names", None)
    if job.images:
        names = saved or [f"label {k}" for k in range(1, classes + 1)]  # for the health check
        return images_in(job.images), names
    data = load_dataset(config.data)
    if classes != data.num_classes:
        raise UserError(
            f"{job.checkpoint}: a network of {classes} classes; the dataset in "
            f"{config.data.root} has {data.num_classes}"
        )
    check_class_names(job.checkpoint, saved, data.classes)
    return data.split(job.split), data.classes


def _claim_predictions(out: Path, target: Path, digest: str) -> None:
    """claim_folder for `predict`'s --out (its manifest beside the results: voc-test's folder
    holds PNGs only), refusing one whose `target` holds PNGs aepsl did not write (no
    manifest): they would be taken for predictions, or overwritten."""
    if not (out / "manifest.json").is_file() and any(target.glob("*.png")):
        raise UserError(
            f"{target}: holds PNG files that `aepsl predict` did not write (no manifest.json); "
            "choose an empty or new --out"
        )
    claim_folder(out, digest)
