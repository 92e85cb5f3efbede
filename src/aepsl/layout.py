"""The run folder: every path a run reads or writes, its manifests and the settings-hash chain.

Stages meet only through these files; this module is the one place that names them.

  OUT/config.yaml                       resolved config, versions, runtime of the last command
  OUT/mine/                             stage 1, adversarial erasing (`aepsl mine`)
    manifest.json  mean_pixel.json  metrics.json  tensorboard/
    step<t>/checkpoint.pt               resumable training state (removed once trained)
    step<t>/classifier.pt               the step's classifier (state dict + its settings)
    step<t>/train.json                  final training loss
    step<t>/regions/<id>.png            regions mined at step t (k = class, 255 = conflict)
    step<t>/cams/<id>.npz               with mine.save_cams or labels.salient_fill: keys, cams
                                        (float16, K x H x W)
    step<t>/cams/<id>.npy               ... with mine.cam_format=irn: IRN's dict (external.py)
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
the stage before it included (the chain below), those settings (to name what changed), and
whether the stage finished. A changed setting re-runs its stage and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

from aepsl.config import Config, flatten
from aepsl.errors import UserError
from aepsl.io import file_digest, read_json, write_json
from aepsl.record import save_config

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
        # where and how the data is read, not what it is: no output depends on these
        "data": config.data.model_dump(
            exclude={"num_workers", "max_pixels", "mask_cache"}
            | (set() if config.data.score_split else {"score_split"})  # in the hash when set
            | (set() if config.data.format == "coco" else {"coco_crowd"})  # when it acts
        ),
        "model": config.model.model_dump(),
        "precision": effective_precision(config),
        section: getattr(config, section).model_dump(exclude=set(exclude)),
    }


def stage_digests(config: Config) -> dict[str, str]:
    """The settings-hash chain: each stage's hash covers its own settings and the hash of the
    stage before it."""
    return {stage: settings_digest(settings) for stage, settings in stage_settings(config).items()}


def stage_settings(config: Config) -> dict[str, dict[str, Any]]:
    """What each stage's hash covers (stage_digests), kept in its manifest so that a refusal
    can name the settings that differ."""
    from aepsl.external import CAM_SUFFIXES, folder_digest

    # Settings added later leave the hashes of earlier runs as they were while at their default.
    new = {"visualise", "checkpoint_every", "step1_cams", "cam_format"}
    new |= set() if config.mine.min_positives else {"min_positives"}  # in the hash when set
    mine_settings = training_settings(config, "mine", new)
    if config.mine.min_positives:  # the floor now counts whole batches only: other epochs
        mine_settings["mine"]["floor"] = "whole batches"
    if config.keeps_cams():  # labels.salient_fill keeps them as save_cams would
        mine_settings["mine"]["save_cams"] = True
    if config.mine.cam_format != "npz":
        mine_settings["mine"]["cam_format"] = config.mine.cam_format
    if config.mine.step1_cams:  # CAMs made elsewhere: their files' names, sizes and mtimes
        mine_settings["step1_cams"] = folder_digest(config.mine.step1_cams, CAM_SUFFIXES)
    mine = settings_digest(mine_settings)
    unhashed = {"visualise", "workers", "dir", "cams_dir"}
    unhashed |= {"crf", "crf_confidence"} if config.labels.crf == "none" else set()  # added later
    unhashed |= set() if config.labels.salient_fill else {"salient_fill", "fill_threshold"}
    labels_settings = config.labels.model_dump(exclude=unhashed)
    if config.labels.crf != "none":  # the CRF's kernels shape the labels too
        labels_settings["crf_kernels"] = config.crf.model_dump(exclude={"workers", "backend"})
    labels: dict[str, Any]
    if config.labels.dir:  # pseudo labels made elsewhere: nothing of ours goes into them
        labels = {"labels_dir": folder_digest(config.labels.dir, (".png",))}
    elif config.labels.cams_dir:  # regions from CAMs made elsewhere, not from mine
        cams = folder_digest(config.labels.cams_dir, CAM_SUFFIXES)
        threshold = config.mine.model_dump(include={"threshold_mode", "threshold"})
        labels = {
            "cams_dir": cams,
            "threshold": threshold,
            "saliency": config.saliency.model_dump(),
            "labels": labels_settings,
        }
    else:
        labels = {"mine": mine, "saliency": config.saliency.model_dump(), "labels": labels_settings}
    # min_iterations acts only on a length in epochs; in the hash only where it can act
    acts = config.train.min_iterations and config.train.epochs is not None
    later = set() if acts else {"min_iterations"}
    later |= set() if config.train.image_size else {"image_size"}  # in the hash when set
    train = training_settings(config, "train", {"checkpoint_every"} | later)
    train["labels"] = settings_digest(labels)
    return {"mine": mine_settings, "labels": labels, "train": train}


def prediction_digest(model_file: Path, config: Config, crf: bool) -> str:
    """What a folder of predictions depends on: the model file's bytes, the predict settings
    and, when refined, the CRF's (not how many processes ran it)."""
    return settings_digest(
        {
            "model": file_digest(model_file),
            "predict": config.predict.model_dump(),
            "crf": config.crf.model_dump(exclude={"workers"}) if crf else None,
        }
    )


def differences(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 4) -> str:
    """The settings that differ between two stage settings, as `key: old -> new` (the first
    `limit`); the settings-hash chain's entries (an earlier stage's hash) as that stage."""
    if old is None:
        return "made by an earlier version, which did not record its settings"
    # compared as the manifest stores them: JSON (tuples become lists)
    flat_old, flat_new = flatten(old), flatten(json.loads(json.dumps(new)))
    changed = flat_old.keys() | flat_new.keys()
    keys = sorted(k for k in changed if flat_old.get(k) != flat_new.get(k))
    shown = [f"{k}: {flat_old.get(k, '(unset)')} -> {flat_new.get(k, '(unset)')}" for k in keys]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown[:limit]) + more


def saliency_cache_digest(config: Config) -> str:
    """What the cached built-in saliency maps depend on: the images and the working size."""
    data = config.data.model_dump(include={"format", "root", "train_split"})
    return settings_digest({"data": data, "max_side": config.saliency.max_side})


def claim_folder(
    folder: Path,
    digest: str,
    required: Iterable[Path] = (),
    settings: dict[str, Any] | None = None,
) -> bool:
    """Resume in `folder` if the same settings produced it; otherwise empty it and start over.

    Returns True when the stage already finished there with these settings (see mark_complete)
    and every `required` output is still there; a finished stage missing one runs again
    (resuming: what is there is kept)."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        record = read_manifest(manifest)
        if record["settings_hash"] == digest:
            if not record["complete"]:
                return False
            missing = next((path for path in required if not path.exists()), None)
            if missing is None:
                return True
            print(f"{folder}: marked finished but {missing} is gone; running this stage again")
            write_json(manifest, _manifest(digest, False, record.get("settings")))
            return False
        changed = f" ({differences(record.get('settings'), settings)})" if settings else ""
        print(f"{folder}: settings changed since the last run{changed}; starting this stage again")
        shutil.rmtree(folder)  # a folder with our manifest: one a stage created
    write_json(manifest, _manifest(digest, False, settings))
    return False


def refuse_inputs_inside(folder: Path, inputs: dict[str, str | os.PathLike]) -> None:
    """A stage empties its folder when its settings change: an input inside it would be
    deleted before it is read. One line naming the setting, before anything is deleted."""
    for key, given in inputs.items():
        path = Path(given).resolve()
        if path == folder.resolve() or path.is_relative_to(folder.resolve()):
            raise UserError(
                f"{given}: {key} lies inside {folder}, which aepsl empties when the settings "
                "of what it holds change; move these files out of the run folder"
            )


def _manifest(digest: str, complete: bool, settings: dict[str, Any] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"settings_hash": digest, "complete": complete}
    if settings is not None:
        record["settings"] = settings
    return record


def read_manifest(path: Path) -> dict[str, Any]:
    """A stage's manifest.json, or a one-line error saying what to do with a damaged one."""
    fix = f"delete the folder {path.parent} and run the stage again"
    record = read_json(path, fix)
    if not isinstance(record.get("settings_hash"), str) or not isinstance(
        record.get("complete"), bool
    ):
        raise UserError(f"{path}: damaged (no settings_hash or complete); {fix}")
    return record


def mark_complete(folder: Path, digest: str, settings: dict[str, Any] | None = None) -> None:
    """Record that the stage in `folder` finished, so a re-run with the same settings skips it."""
    write_json(folder / "manifest.json", _manifest(digest, True, settings))


# The folders each dataset format reads from (below data.root): no run folder may be one of
# them, hold one, or lie inside one.
DATASET_FOLDERS = {
    "folder": ("images", "masks", "saliency", "splits"),
    "voc": (
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "Annotations",
        "ImageSets",
        "saliency",
    ),
    "coco": ("train2014", "val2014", "annotations"),
}


def check_out(out: Path, config: Config, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that would write into the dataset: data.root
    itself, a folder above it, or one of the folders the dataset is read from (or inside one).
    A run folder elsewhere under data.root is fine."""
    if config.data.root is None:
        return
    target = Path(out).resolve()
    root = Path(config.data.root).resolve()
    used = [root / name for name in DATASET_FOLDERS.get(config.data.format, ())]
    if config.saliency.dir:
        used.append(Path(config.saliency.dir).resolve())
    for folder in [root, *used]:
        if folder == target or folder.is_relative_to(target):
            place = "is" if folder == target else "holds"
            raise UserError(
                f"{out}: {what} {place} the dataset's folder {folder}; aepsl never writes into a "
                "dataset: choose another run folder (under data.root is fine, e.g. "
                f"{root / 'runs' / 'NAME'})"
            )
        if folder != root and target.is_relative_to(folder):
            raise UserError(
                f"{out}: {what} lies inside the dataset's folder {folder}; aepsl never writes "
                "into a dataset: choose another run folder"
            )


NAME_MAX, PATH_MAX = 255, 4096  # bytes: Linux's limits for one component and a whole path


def as_out(given: str | os.PathLike, what: str = "--out") -> Path:
    """An output folder argument as a Path, refusing in one line an empty one (which would
    write into the working folder) and a name the file system cannot hold."""
    text = os.fspath(given)
    if not str(text).strip():
        raise UserError(f"{what} is empty: name the folder to write to")
    path = Path(text)
    long_part = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long_part is not None:
        raise UserError(
            f"{what} {_short(str(path))}: the folder name {_short(long_part)} is "
            f"{len(os.fsencode(long_part))} bytes, over the {NAME_MAX} a file name may have"
        )
    if len(os.fsencode(str(path.absolute()))) > PATH_MAX - NAME_MAX:
        raise UserError(
            f"{what} {_short(str(path))}: the path is too long for the files written inside it "
            f"(over {PATH_MAX - NAME_MAX} bytes); choose a shorter one"
        )
    return path


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def writable_out(path: str | os.PathLike) -> Path:
    """The output folder, created, after a probe file showed it writable (a one-line error
    otherwise)."""
    out = as_out(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".aepsl-write-test.", dir=out)  # unique per rank
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise UserError(f"{out}: output folder is not writable ({exc.strerror})") from None
    return out


@contextmanager
def open_run(config: Config, out: str | os.PathLike, reads: str | None = None) -> Iterator[Path]:
    """The run folder of a stage command, checked (outside the dataset, writable; the stage it
    `reads` made with these settings), held by this process (run_lock) with the resolved config
    saved in it, for the block."""
    check_out(as_out(out), config)
    if reads is not None:
        RunLayout(out, config).check_input(reads)
    folder = writable_out(out)
    with run_lock(folder):
        save_config(config, folder)
        yield folder


LOCK_FILE = ".aepsl.lock"


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` for this process: a second aepsl process on it stops in one line naming
    the holder (pid, host, command). The kernel drops the lock when its process ends, however
    it ends, so a dead process's lock is taken over. The processes of one torchrun job (RANK
    set, not 0) share rank 0's. Where the OS has no flock (Windows), nothing is held."""
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    path = folder / LOCK_FILE
    fd = _take_lock(path)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}
        os.ftruncate(fd, 0)  # a killed holder's words may still be there
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: see _take_lock
        os.close(fd)


def _take_lock(path: Path) -> int:
    """An open, exclusively locked descriptor of the lock file at `path`. A holder removes the
    file before it unlocks, so a lock taken on a file that is no longer at `path` is dropped
    and taken again on the new one (else two processes could each hold one)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{path.parent}: in use by another aepsl process ({_holder(path)}); wait for it "
                "to end, or choose another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _command() -> str:
    words = ["aepsl", *sys.argv[1:]] if Path(sys.argv[0]).name == "aepsl" else sys.argv
    text = " ".join(words)
    return text if len(text) <= 120 else text[:117] + "..."


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
        return f"pid {holder['pid']} on {holder['host']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


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

    def cam(self, image_id: str, cam_format: str = "npz") -> Path:
        """<id>.npz (ours) or, for mine.cam_format=irn, <id>.npy (IRN's)."""
        return self.cams / f"{image_id}.{'npy' if cam_format == 'irn' else 'npz'}"


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

    def settings(self, stage: str) -> dict[str, Any]:
        """What the settings hash of `stage` covers (stage_settings). Each call lists any
        folders made elsewhere again (their files' names, sizes and mtimes)."""
        return stage_settings(self.config)[stage]

    def digest(self, stage: str) -> str:
        """The settings hash of `stage` (mine, labels or train) in the chain."""
        return settings_digest(self.settings(stage))

    def folder(self, stage: str) -> Path:
        return {"mine": self.mine, "labels": self.labels, "train": self.train}[stage]

    def claim(self, stage: str, required: Iterable[Path] = ()) -> bool:
        """claim_folder for `stage`: True when it already finished with these settings and
        its `required` outputs are there."""
        settings = self.settings(stage)
        refuse_inputs_inside(self.folder(stage), self.inputs())
        return claim_folder(self.folder(stage), settings_digest(settings), required, settings)

    def inputs(self) -> dict[str, str]:
        """The folders of files made elsewhere that the config names, by key."""
        config = self.config
        named = {
            "mine.step1_cams": config.mine.step1_cams,
            "labels.dir": config.labels.dir,
            "labels.cams_dir": config.labels.cams_dir,
            "saliency.dir": config.saliency.dir,
        }
        return {key: folder for key, folder in named.items() if folder}

    def finished(self, stage: str, required: Iterable[Path] = ()) -> bool:
        """claim(stage, required), saying so in one line when the stage is skipped."""
        if not self.claim(stage, required):
            return False
        print(f"{stage}: finished for these settings in {self.folder(stage)}; skipped")
        return True

    def reads(self, stage: str) -> bool:
        """Whether the stage after `stage` reads its folder: not when the pseudo labels
        (labels.dir) or the CAMs they are built from (labels.cams_dir) were made elsewhere."""
        if stage == "mine":
            return not (self.config.labels.dir or self.config.labels.cams_dir)
        return not (stage == "labels" and self.config.labels.dir)

    def check_input(self, stage: str) -> None:
        """Stop with one line when `stage`'s folder, which the next stage reads, was made by
        aepsl with other settings than these or is unfinished. A folder without a manifest is
        not aepsl's (e.g. pseudo labels made elsewhere) and is taken as it is."""
        manifest = self.folder(stage) / "manifest.json"
        if not manifest.is_file() or not self.reads(stage):
            return
        record = read_manifest(manifest)
        settings = self.settings(stage)
        if record["settings_hash"] != settings_digest(settings):
            changed = differences(record.get("settings"), settings)
            raise UserError(
                f"{self.folder(stage)}: made with other settings than these ({changed}); run "
                f"`aepsl {stage}` with the same settings and --out first (or `aepsl run`)"
            )
        if not record["complete"]:
            raise UserError(
                f"{self.folder(stage)}: unfinished; run `aepsl {stage}` with this --out to "
                "finish it first"
            )

    def mark_complete(self, stage: str) -> None:
        """The stage finished: its folder gets the config that made it, then the manifest."""
        save_config(self.config, self.folder(stage))
        settings = self.settings(stage)
        mark_complete(self.folder(stage), settings_digest(settings), settings)

    def redo(self, stage: str) -> str:
        """What to do about a damaged file of `stage`'s folder (the end of an error line)."""
        return f"delete the folder {self.folder(stage)} and run `aepsl {stage}` again"
