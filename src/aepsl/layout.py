"""The run folder: every path a run reads or writes, its manifests and the settings-hash chain.

Stages meet only through these files; this module is the one place that names them.

  OUT/config.yaml                       resolved config, versions, runtime of the last command
  OUT/mine/                             stage 1, adversarial erasing (`aepsl mine`)
    manifest.json  mean_pixel.json  metrics.json  tensorboard/
    step<t>/checkpoint.pt               resumable training state (removed once trained)
    step<t>/classifier.pt               the step's classifier (state dict + its settings)
    step<t>/train.json                  final training loss
    step<t>/regions/<id>.png            regions mined at step t (k = class, 255 = conflict)
    step<t>/cams/<id>.npz               with mine.save_cams: keys, cams (float16, K x H x W)
    step<t>/vis/<id>.png                erased image | CAM | regions, for a few images
    step<t>/done.json                   the step's metrics, written last
    regions/<id>.png                    union over the steps used
  OUT/saliency/<id>.png                 built-in saliency maps (cache of `aepsl labels`)
  OUT/labels/                           stage 2, pseudo labels (`aepsl labels`)
    manifest.json  metrics.json  <id>.png  vis/<id>.png
  OUT/train/                            stage 3, PSL (`aepsl train`)
    manifest.json  checkpoint.pt  model.pt  train.json  metrics.json  tensorboard/
  OUT/predict/, OUT/predict_crf/        val predictions without / with CRF: manifest.json,
                                        <id>.png, overlay/<id>.png
  OUT/report/predict{,_crf}/            predictions of the report's training images
  OUT/report.html                       the report

A stage folder's manifest.json holds the hash of the settings that produced it, the hash of
the stage before it included (the chain below), and whether the stage finished. A changed
setting re-runs its stage and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from aepsl.config import Config
from aepsl.io import write_json

STAGES = ("mine", "labels", "train")


def settings_digest(settings: dict[str, Any]) -> str:
    """A short hash of the settings that determine a stage's outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def training_settings(
    config: Config, section: str, exclude: set[str] = frozenset()
) -> dict[str, Any]:
    """The settings a training stage's outputs depend on: seed, data, model, precision and the
    stage's own section (less `exclude`, e.g. how often it checkpoints)."""
    from aepsl.runtime import effective_precision

    return {
        "seed": config.seed,
        "data": config.data.model_dump(exclude={"num_workers", "max_pixels"}),  # no output
        "model": config.model.model_dump(),
        "precision": effective_precision(config),
        section: getattr(config, section).model_dump(exclude=set(exclude)),
    }


def stage_digests(config: Config) -> dict[str, str]:
    """The settings-hash chain: each stage's hash covers its own settings and the hash of the
    stage before it."""
    mine = settings_digest(training_settings(config, "mine", {"visualise", "checkpoint_every"}))
    labels = settings_digest(
        {
            "mine": mine,
            "saliency": config.saliency.model_dump(),
            "labels": config.labels.model_dump(exclude={"visualise"}),
        }
    )
    train = training_settings(config, "train", {"checkpoint_every"})
    train["labels"] = labels
    return {"mine": mine, "labels": labels, "train": settings_digest(train)}


def saliency_cache_digest(config: Config) -> str:
    """What the cached built-in saliency maps depend on: the images and the working size."""
    data = config.data.model_dump(include={"format", "root", "train_split"})
    return settings_digest({"data": data, "max_side": config.saliency.max_side})


def claim_folder(folder: Path, digest: str) -> bool:
    """Resume in `folder` if the same settings produced it; otherwise empty it and start over.

    Returns True when the stage already finished there with these settings (see mark_complete).
    """
    manifest = folder / "manifest.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text())
        if record.get("settings_hash") == digest:
            return bool(record.get("complete"))
        print(f"{folder}: settings changed since the last run; starting this stage again")
        shutil.rmtree(folder)
    write_json(manifest, {"settings_hash": digest, "complete": False})
    return False


def mark_complete(folder: Path, digest: str) -> None:
    """Record that the stage in `folder` finished, so a re-run with the same settings skips it."""
    write_json(folder / "manifest.json", {"settings_hash": digest, "complete": True})


class MineStep:
    """OUT/mine/step<t>: one erasing step's files."""

    def __init__(self, mine: Path, step: int) -> None:
        self.number = step
        self.root = mine / f"step{step}"
        self.checkpoint = self.root / "checkpoint.pt"
        self.classifier = self.root / "classifier.pt"
        self.train_log = self.root / "train.json"
        self.regions = self.root / "regions"
        self.cams = self.root / "cams"
        self.vis = self.root / "vis"
        self.done = self.root / "done.json"

    def region(self, image_id: str) -> Path:
        return self.regions / f"{image_id}.png"

    def cam(self, image_id: str) -> Path:
        return self.cams / f"{image_id}.npz"


class RunLayout:
    """Every path of the run folder `out`, and its stages' manifests for `config`'s settings."""

    def __init__(self, out: str | Path, config: Config) -> None:
        out = Path(out)
        self.out = out
        self.config = config
        self.config_file = out / "config.yaml"
        self.mine = out / "mine"
        self.mean_pixel = self.mine / "mean_pixel.json"
        self.mine_metrics = self.mine / "metrics.json"
        self.mine_tensorboard = self.mine / "tensorboard"
        self.union_regions = self.mine / "regions"
        self.saliency = out / "saliency"
        self.labels = out / "labels"
        self.labels_metrics = self.labels / "metrics.json"
        self.labels_vis = self.labels / "vis"
        self.train = out / "train"
        self.train_checkpoint = self.train / "checkpoint.pt"
        self.model = self.train / "model.pt"
        self.train_log = self.train / "train.json"
        self.train_metrics = self.train / "metrics.json"
        self.train_tensorboard = self.train / "tensorboard"
        self.predict = out / "predict"
        self.predict_crf = out / "predict_crf"
        self.report_predict = out / "report" / "predict"
        self.report_predict_crf = out / "report" / "predict_crf"
        self.report = out / "report.html"

    def step(self, step: int) -> MineStep:
        return MineStep(self.mine, step)

    def steps_on_disk(self) -> list[int]:
        """The erasing steps that have a folder, in order."""
        found = [p.name[4:] for p in self.mine.glob("step*") if p.is_dir()]
        return sorted(int(s) for s in found if s.isdigit())

    def drawn_ids(self) -> set[str]:
        """Ids of the training images `mine` drew in some step's vis/: the report's samples."""
        return {p.stem for step in self.steps_on_disk() for p in self.step(step).vis.glob("*.png")}

    def union_region(self, image_id: str) -> Path:
        return self.union_regions / f"{image_id}.png"

    def pseudo_label(self, image_id: str) -> Path:
        return self.labels / f"{image_id}.png"

    def saliency_map(self, image_id: str) -> Path:
        return self.saliency / f"{image_id}.png"

    def digest(self, stage: str) -> str:
        """The settings hash of `stage` (mine, labels or train) in the chain."""
        return stage_digests(self.config)[stage]

    def folder(self, stage: str) -> Path:
        return {"mine": self.mine, "labels": self.labels, "train": self.train}[stage]

    def claim(self, stage: str) -> bool:
        """claim_folder for `stage`: True when it already finished with these settings."""
        return claim_folder(self.folder(stage), self.digest(stage))

    def mark_complete(self, stage: str) -> None:
        mark_complete(self.folder(stage), self.digest(stage))
