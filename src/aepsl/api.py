"""The Python API: the stages as functions, and a trained network as an object that segments
images. The `aepsl` command is a thin layer over these functions.

    import aepsl
    result = aepsl.run("own_data", "runs/x", data__root="/data/mine")
    segmenter = aepsl.load_segmenter("runs/x/train/model.pt")
    labels = segmenter.predict(image)            # (H, W) uint8: 0 background, k class k

Every function takes a config as a Config, a preset name (`aepsl presets`), a YAML path or
None (the defaults), and overrides as keywords whose `__` stands for the dot of a config key
(`mine__steps=2` is `mine.steps=2`). Bad input raises `aepsl.UserError` with the one line the
command prints. Within each call, images are read under the config's `data.max_pixels`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from aepsl.config import Config, flatten, load_config
from aepsl.errors import UserError
from aepsl.io import pixel_limit

ConfigLike = Config | str | os.PathLike | None


def resolve_config(config: ConfigLike = None, **overrides: Any) -> Config:
    """A Config from a Config, a preset name, a YAML path or None (the defaults), with
    `overrides` applied (`__` in a keyword is the dot of a config key)."""
    from aepsl.presets import resolve_config_path

    settings = {key.replace("__", "."): value for key, value in overrides.items()}
    if "train.iterations" in settings and "train.epochs" not in settings:
        settings["train.epochs"] = None  # a length given here replaces one in epochs
    if isinstance(config, Config):
        if not settings:
            return config
        given = flatten(config.model_dump(exclude_unset=True))  # what is unset stays unset
        return load_config(None, settings={**given, **settings})
    return load_config(resolve_config_path(config), settings=settings)


@dataclass(frozen=True)
class StageResult:
    """What a stage wrote: its folder, and the metrics it wrote there (also returned when the
    stage was already finished and skipped)."""

    stage: str
    folder: Path
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunResult:
    """What `run` wrote: the run folder, each stage's result and the HTML report."""

    out: Path
    mine: StageResult
    labels: StageResult
    train: StageResult
    report: Path


def run_stage(
    stage: Literal["mine", "labels", "train"],
    config: ConfigLike,
    out: str | os.PathLike,
    **overrides: Any,
) -> StageResult:
    """One stage into run folder `out`, resumable, skipped when it finished with these
    settings: `mine` (adversarial erasing, OUT/mine), `labels` (pseudo labels from OUT/mine and
    saliency, OUT/labels) or `train` (the segmentation network on OUT/labels, PSL unless
    train.psl=false, then the val split predicted and scored without and with CRF;
    OUT/train)."""
    from aepsl.layout import open_run
    from aepsl.mine.stage import run_mine
    from aepsl.pipeline import labels_stage, train_stage

    # each stage's function, and the stage whose folder it reads
    stages = {
        "mine": (run_mine, None),
        "labels": (labels_stage, "mine"),
        "train": (train_stage, "labels"),
    }
    if stage not in stages:
        raise UserError(f"unknown stage '{stage}' (mine, labels or train)")
    function, reads = stages[stage]
    config = resolve_config(config, **overrides)
    with pixel_limit(config.data.max_pixels), open_run(config, out, reads) as folder:
        return StageResult(stage, folder / stage, function(config, folder))


def run(config: ConfigLike, out: str | os.PathLike, **overrides: Any) -> RunResult:
    """The whole method: mine, labels, train, val prediction and OUT/report.html."""
    from aepsl.layout import open_run
    from aepsl.pipeline import run_pipeline

    config = resolve_config(config, **overrides)
    with pixel_limit(config.data.max_pixels), open_run(config, out) as folder:
        result = run_pipeline(config, folder)
    return RunResult(
        folder,
        StageResult("mine", folder / "mine", result["mine"]),
        StageResult("labels", folder / "labels", result["labels"]),
        StageResult("train", folder / "train", result["val"]),
        Path(result["report"]),
    )


def predict(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    config: ConfigLike = None,
    *,
    split: str | None = None,
    images: str | os.PathLike | None = None,
    crf: bool = False,
    format: Literal["png", "voc-test"] = "png",
    **overrides: Any,
) -> dict[str, Any]:
    """Segment a split of the configured dataset (`split`) or a folder (`images`) into OUT as
    index PNGs (and overlays); returns the folder, counts and collapse warnings."""
    from aepsl.inference.predict import PredictJob, run_predict
    from aepsl.layout import as_out

    config = resolve_config(config, **overrides)
    job = PredictJob(
        Path(checkpoint),
        as_out(out),
        split,
        None if images is None else Path(images),
        crf,
        format,
    )
    with pixel_limit(config.data.max_pixels):
        return run_predict(config, job)


def evaluate(
    predictions: str | os.PathLike,
    config: ConfigLike = None,
    *,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    pred_ignore: Literal["exclude", "background"] = "exclude",
    **overrides: Any,
) -> dict[str, Any]:
    """Score a folder of <id>.png predictions against the dataset's masks (mIoU, per class);
    writes OUT/metrics.json (default OUT: the predictions' folder)."""
    from aepsl.evaluation import run_evaluate
    from aepsl.layout import as_out

    config = resolve_config(config, **overrides)
    folder = None if out is None else as_out(out)
    with pixel_limit(config.data.max_pixels):
        return run_evaluate(config, Path(predictions), folder, split, pred_ignore)


ImageLike = Any  # a PIL image, or a uint8 array (H, W, 3) or (H, W)


class Segmenter:
    """A trained segmentation network (`aepsl train`'s model.pt) that segments images, with the
    file's own preprocessing (the size it was trained at) and the config's predict settings
    (scales, flip, classifier weighting) and CRF."""

    def __init__(self, model: Any, config: Config, device: Any) -> None:
        self.model, self.config, self.device = model, config, device

    @property
    def num_classes(self) -> int:
        """Object classes (label k = class k; 0 is background)."""
        return int(self.model.classifier.out_channels) - 1

    def predict(
        self, images: ImageLike | Sequence[ImageLike], crf: bool = False, scores: bool = False
    ) -> Any:
        """Label maps of one image ((H, W) uint8) or of a batch (a list of them: a list of
        images, or an (N, H, W, 3) array). `crf`: refined by the dense CRF (torch backend).
        `scores`: (labels, probabilities) pairs instead, probabilities (C+1, H, W) float32
        (before the CRF)."""
        from aepsl.inference.crf import crf_labels_torch
        from aepsl.inference.crf_params import CrfParams
        from aepsl.inference.predict import predict_probs

        single = _is_single(images)
        arrays = [_as_rgb(image) for image in ([images] if single else images)]
        with pixel_limit(self.config.data.max_pixels):
            probs = [predict_probs(self.model, a, self.config, self.device) for a in arrays]
        if crf:
            params = CrfParams.from_config(self.config.crf)
            labels = crf_labels_torch(arrays, probs, self.device, params=params)
        else:
            labels = [p.argmax(0).astype(np.uint8) for p in probs]
        out = list(zip(labels, probs, strict=True)) if scores else labels
        return out[0] if single else out


def load_segmenter(
    path: str | os.PathLike,
    device: str | None = None,
    config: ConfigLike = None,
    **overrides: Any,
) -> Segmenter:
    """The network of a model.pt file, built as the file says (a file of an earlier version,
    without its settings: as `config` says), on `device` ("cpu", "cuda", "auto"; default: the
    config's, auto: a GPU when there is one); `config` and `overrides` give the predict and crf
    settings."""
    from aepsl.models.segnet import load_segnet
    from aepsl.runtime import prepare_model, select_device

    if device is not None:
        overrides["device"] = device
    config = resolve_config(config, **overrides)
    model = load_segnet(path, config)
    device_ = select_device(config)
    return Segmenter(prepare_model(model, config, device_).eval(), config, device_)


def _is_single(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return not isinstance(images, (list, tuple))


def _as_rgb(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or a uint8 array (grey (H, W) repeated)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise UserError(f"image array of dtype {array.dtype}: expected uint8 (0..255)")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise UserError(f"image array of shape {array.shape}: expected (H, W, 3) or (H, W)")
    return np.ascontiguousarray(array)
