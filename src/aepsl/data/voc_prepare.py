"""`aepsl prepare-voc`: add SBD's masks and the train_aug split to a PASCAL VOC 2012 folder.

Reads the SBD release (`benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}`) and
VOC 2012 (`JPEGImages/`, `SegmentationClass/`, `ImageSets/Segmentation/{train,val}.txt`), and
adds to the VOC folder:

- `SegmentationClassAug/<id>.png` for every id of SBD train + val and VOC train + val, as
  palette index PNGs; where VOC's own `SegmentationClass/<id>.png` exists its indices are
  copied (VOC wins over SBD), otherwise SBD's `GTcls.Segmentation` is converted;
- `ImageSets/Segmentation/train_aug.txt` = (SBD train + SBD val + VOC train) - VOC val, sorted
  (10,582 ids on the real data).

The one command that writes into a dataset folder, and it only adds: an existing mask is left
alone (and counted), an existing train_aug.txt must list the same ids, nothing is deleted.
Every file is written atomically and the list last, so an interrupted run is resumed by
running it again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.io
from tqdm import tqdm

from aepsl.data.datasets import VOC_CLASSES, _read_lines, check_id, image_size
from aepsl.errors import UserError
from aepsl.io import read_index_png, write_index_png, write_text
from aepsl.labelmap import IGNORE

EXPECTED_TRAIN_AUG = 10_582  # SBD train + val + VOC train - VOC val, on the official releases


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def voc_root(voc: Path) -> Path:
    """VOCdevkit/VOC2012, given it or the VOCdevkit folder holding it."""
    voc = Path(voc)
    if (voc / "VOC2012").is_dir():
        voc = voc / "VOC2012"
    if not (voc / "JPEGImages").is_dir():
        raise UserError(f"{voc / 'JPEGImages'}: not found; --voc must be VOCdevkit/VOC2012")
    return voc


def sbd_root(sbd: Path) -> Path:
    """SBD's `dataset` folder, given it or the `benchmark_RELEASE` folder holding it."""
    sbd = Path(sbd)
    if (sbd / "dataset" / "cls").is_dir():
        sbd = sbd / "dataset"
    if not (sbd / "cls").is_dir():
        raise UserError(f"{sbd / 'cls'}: not found; --sbd must be SBD's benchmark_RELEASE folder")
    return sbd


def read_id_list(path: Path) -> list[str]:
    """Image ids of a split file, one per line (first token; SBD-style paths reduced to ids)."""
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    ids = []
    for line in _read_lines(path):
        first = line.split()[0]
        ids.append(check_id(Path(first).stem if "/" in first else first, str(path)))
    return ids


def train_aug_ids(
    sbd_train: list[str], sbd_val: list[str], voc_train: list[str], voc_val: list[str]
) -> list[str]:
    """(SBD train + SBD val + VOC train) minus VOC val, sorted: the field's train_aug split."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_sbd_mask(path: Path) -> np.ndarray:
    """The HxW class map of an SBD `cls/<id>.mat` (struct GTcls, field Segmentation), uint8."""
    if not path.is_file():
        raise UserError(f"{path}: SBD mask not found")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, TypeError, ...
        raise UserError(f"{path}: cannot read SBD mask ({_one_line(exc)})") from None
    try:
        seg = np.asarray(mat["GTcls"][0]["Segmentation"][0])
    except (KeyError, IndexError, ValueError, TypeError):
        raise UserError(f"{path}: not an SBD class mask (no struct GTcls.Segmentation)") from None
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.number):
        raise UserError(f"{path}: GTcls.Segmentation is not a 2-D class map (shape {seg.shape})")
    bad = (seg != np.round(seg)) | (seg < 0) | ((seg > len(VOC_CLASSES)) & (seg != IGNORE))
    if bad.any():
        raise UserError(
            f"{path}: label {seg[bad].flat[0]} is out of range (0..{len(VOC_CLASSES)} or 255)"
        )
    return seg.astype(np.uint8)


def _check_existing_list(path: Path, ids: list[str]) -> bool:
    """True if `path` already lists exactly `ids` (in any order or line format)."""
    if not path.exists():
        return False
    have = set(read_id_list(path))
    if have != set(ids):
        extra, missing = len(have - set(ids)), len(set(ids) - have)
        raise UserError(
            f"{path}: exists with different ids ({extra} not in train_aug, {missing} of train_aug "
            "missing); move it away to have prepare-voc write its own"
        )
    return True


def prepare_voc(voc: Path, sbd: Path) -> dict:
    """Add SegmentationClassAug/ and ImageSets/Segmentation/train_aug.txt to VOC 2012.

    Returns counts: `train_aug` (ids in the list), `masks_from_voc` / `masks_from_sbd` (PNGs
    written from each source), `masks_existing` (PNGs already there, left alone) and
    `list` ("written" or "existing"), plus the paths written to.
    """
    voc, sbd = voc_root(voc), sbd_root(sbd)
    sets = voc / "ImageSets" / "Segmentation"
    sbd_train, sbd_val = read_id_list(sbd / "train.txt"), read_id_list(sbd / "val.txt")
    voc_train, voc_val = read_id_list(sets / "train.txt"), read_id_list(sets / "val.txt")
    aug_ids = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
    list_path = sets / "train_aug.txt"
    list_exists = _check_existing_list(list_path, aug_ids)

    sbd_ids = set(sbd_train) | set(sbd_val)
    all_ids = sorted(sbd_ids | set(voc_train) | set(voc_val))
    voc_masks, aug_dir = voc / "SegmentationClass", voc / "SegmentationClassAug"

    # Every source must be there before anything is written.
    todo: list[tuple[str, Path]] = []
    existing = 0
    for image_id in all_ids:
        image = voc / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise UserError(f"{image}: image not found (a VOC 2012 trainval release has it)")
        if (aug_dir / f"{image_id}.png").exists():
            existing += 1
            continue
        source = voc_masks / f"{image_id}.png"
        if not source.is_file():
            if image_id not in sbd_ids:
                raise UserError(f"{source}: not found (listed in {sets}/train.txt or val.txt)")
            source = sbd / "cls" / f"{image_id}.mat"
            if not source.is_file():
                raise UserError(
                    f"{source}: SBD mask not found (listed in {sbd}/train.txt or val.txt)"
                )
        todo.append((image_id, source))

    from_voc = from_sbd = 0
    with tqdm(todo, desc="SegmentationClassAug", unit="img", dynamic_ncols=True) as bar:
        for image_id, source in bar:  # the bar is closed before an error is printed
            if source.suffix == ".mat":
                labels = read_sbd_mask(source)
                from_sbd += 1
            else:
                labels = read_index_png(source)
                from_voc += 1
            image = voc / "JPEGImages" / f"{image_id}.jpg"
            height, width = image_size(image)
            if labels.shape != (height, width):
                raise UserError(
                    f"{source}: mask is {labels.shape[1]}x{labels.shape[0]} but {image} is "
                    f"{width}x{height}"
                )
            write_index_png(aug_dir / f"{image_id}.png", labels)

    if not list_exists:
        write_text(list_path, "".join(f"{i}\n" for i in aug_ids))
    if len(aug_ids) != EXPECTED_TRAIN_AUG:
        warnings.warn(
            f"train_aug has {len(aug_ids)} ids, not the {EXPECTED_TRAIN_AUG} of the official VOC "
            "2012 + SBD releases",
            stacklevel=2,
        )
    return {
        "train_aug": len(aug_ids),
        "masks_from_voc": from_voc,
        "masks_from_sbd": from_sbd,
        "masks_existing": existing,
        "list": "existing" if list_exists else "written",
        "list_path": str(list_path),
        "mask_dir": str(aug_dir),
    }
