"""Dataset readers. A dataset is a list of classes and named splits of samples; pixels are read
lazily, so a split of any size costs only its file names and label sets in memory.

Formats (docs/datasets.md and docs/own_data.md describe them in full):
- `folder`: ROOT/images/<id>.(jpg|jpeg|png), ROOT/classes.txt, ROOT/labels.csv (image,labels),
  optional ROOT/masks/<id>.png, ROOT/splits/<split>.txt, ROOT/saliency/<id>.png.
- `voc`: PASCAL VOC 2012 (VOCdevkit/VOC2012) with the optional SBD `SegmentationClassAug/`.
- `coco`: MS COCO 2014 (train2014/, val2014/, annotations/instances_*.json), masks cached
  outside the dataset folder (aepsl.data.coco).
"""

from __future__ import annotations

import csv
import io
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from aepsl.config import DataConfig
from aepsl.data.coco import load_coco
from aepsl.data.types import Dataset, Sample, check_id, short, warn_skipped
from aepsl.errors import UserError
from aepsl.io import read_header, read_image, read_index_png
from aepsl.labelmap import IGNORE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def load_image(sample: Sample) -> np.ndarray:
    return read_image(sample.image)


def load_mask(sample: Sample, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Read a ground-truth mask and check it against its image's size and the class count."""
    assert sample.mask is not None
    mask = read_index_png(sample.mask)
    if mask.shape != tuple(shape):
        raise UserError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]}"
        )
    bad = (mask > num_classes) & (mask != IGNORE)
    if bad.any():
        raise UserError(
            f"{sample.mask}: label {int(mask[bad].max())} is out of range (0..{num_classes} or 255)"
        )
    return mask


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header only, after EXIF rotation."""
    with read_header(path) as image:  # refuses an empty, unreadable or oversized file
        width, height = image.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # corrupt EXIF: read_image warns, naming the file
                orientation = image.getexif().get(0x0112, 1)
        except Exception as exc:  # a hostile file's EXIF block
            raise UserError(f"{path}: cannot decode image ({short(str(exc), 200)})") from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def check_headers(samples: Iterable[Sample], saliency: bool = False) -> None:
    """Before a stage spends hours: every image's header decodes (within data.max_pixels) and
    every mask (and with `saliency`, saliency map) has its image's size. Headers only, one pass;
    raises UserError naming the first bad file."""
    for sample in samples:
        height, width = image_size(sample.image)
        others = [sample.mask, sample.saliency if saliency else None]
        for path in (p for p in others if p is not None):
            with read_header(path) as header:
                w, h = header.size
            if (h, w) != (height, width):
                kind = "mask" if path == sample.mask else "saliency map"
                raise UserError(
                    f"{path}: {kind} is {w}x{h} but its image {sample.image.name} is "
                    f"{width}x{height}"
                )


def check_inputs(dataset: Dataset, data: DataConfig) -> None:
    """check_headers over the training split and, when there is one, the val split."""
    for split in (data.train_split, data.val_split):
        if dataset.has_split(split):
            check_headers(dataset.split(split))


def scored_samples(dataset: Dataset, data: DataConfig) -> tuple[str, list[Sample]]:
    """(name, samples) of the split the training-image metrics are computed on
    (data.score_split): the training split's images that are in it."""
    name = data.score_split or ("train" if data.format == "voc" else data.train_split)
    train = dataset.split(data.train_split)
    if name == data.train_split:
        return name, train
    ids = {sample.id for sample in dataset.split(name)}
    return name, [sample for sample in train if sample.id in ids]


def validate(dataset: Dataset, split: str) -> None:
    """Decode every image and mask of a split once; raises UserError on the first bad file."""
    for sample in dataset.split(split):
        image = load_image(sample)
        if sample.mask is not None:
            load_mask(sample, image.shape[:2], dataset.num_classes)


# ---------------------------------------------------------------- folder


def _read_text(path: Path) -> str:
    """A text file of the dataset: UTF-8 (a BOM allowed), no NUL byte."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise UserError(f"{path}:{line}: NUL byte in a text file")
    return text


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _read_csv(path: Path) -> list[tuple[int, list[str]]]:
    """Every row of a CSV file with the line it starts on; broken quoting and fields over the
    csv module's size limit are errors naming that line."""
    reader = csv.reader(io.StringIO(_read_text(path)), strict=True)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        problem = str(exc)
        if "field limit" in problem:
            problem = f"field longer than {csv.field_size_limit()} characters"
        elif "end of data" in problem:
            problem = "a quoted field is never closed"
        raise UserError(f"{path}:{start}: broken CSV ({problem})") from None
    return rows


def _read_classes(path: Path) -> list[str]:
    """classes.txt: one name per line, class k on the k-th line (blank lines at the end only).
    Background is class 0 and not listed, or every id would shift by one."""
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    first_seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        where = f"{path}:{number}"
        if not name:
            raise UserError(f"{where}: empty class name (one name per line, no blank lines)")
        if any(c.isspace() or not c.isprintable() for c in name):
            raise UserError(
                f"{where}: class name {short(name)!r} contains a space or a control character "
                "(labels.csv separates names by spaces)"
            )
        if name.lower().strip("_") == "background":
            raise UserError(
                f"{where}: '{name}' is listed as a class; background is class 0 and not listed "
                "(listing it shifts every class id by one)"
            )
        if name in first_seen:
            raise UserError(
                f"{where}: class '{short(name)}' is listed twice (first on line {first_seen[name]})"
            )
        first_seen[name] = number
        if len(first_seen) >= IGNORE:
            raise UserError(f"{where}: at most 254 classes fit in an index PNG")
    if not first_seen:
        raise UserError(f"{path}: lists no classes")
    return list(first_seen)


def _first_duplicate(items: list[str]) -> str | None:
    """The first item seen twice, in one pass."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _find_image(folder: Path, image_id: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        path = folder / f"{image_id}{ext}"
        if path.is_file():
            return path
    return None


def _labels_from_mask(path: Path, num_classes: int) -> tuple[int, ...]:
    values = np.unique(read_index_png(path))
    bad = [int(v) for v in values if v > num_classes and v != IGNORE]
    if bad:
        raise UserError(f"{path}: label {bad[0]} is out of range (0..{num_classes} or 255)")
    return tuple(int(v) for v in values if 0 < v <= num_classes)


def load_folder(root: Path, empty_labels: str = "skip") -> Dataset:
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    classes_path = root / "classes.txt"
    if not classes_path.is_file():
        raise UserError(f"{classes_path}: missing (one class name per line, no background)")
    classes = _read_classes(classes_path)
    index = {name: k + 1 for k, name in enumerate(classes)}

    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        raise UserError(f"{labels_path}: missing (header 'image,labels')")
    rows = _read_csv(labels_path)
    if not rows or [c.strip() for c in rows[0][1]] != ["image", "labels"]:
        got = short(",".join(rows[0][1])) if rows else "nothing"
        raise UserError(f"{labels_path}: header must be 'image,labels', got '{got}'")

    images_dir, masks_dir, sal_dir = root / "images", root / "masks", root / "saliency"
    samples: dict[str, Sample] = {}
    skipped: dict[str, int] = {}
    skipped_ids: set[str] = set()
    for line_no, row in rows[1:]:
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{labels_path}:{line_no}"
        if len(row) != 2:
            raise UserError(f"{where}: expected 2 columns (image,labels), got {len(row)}")
        image_id = check_id(row[0].strip(), where)
        if image_id in samples:
            raise UserError(f"{where}: duplicate image id '{image_id}'")
        names = row[1].split()
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UserError(
                f"{where}: unknown class name '{short(unknown[0])}' (not in classes.txt)"
            )
        labels = tuple(sorted({index[n] for n in names}))
        if not labels:
            if empty_labels == "error":
                raise UserError(f"{where}: image '{image_id}' has an empty label set")
            skipped["empty label set"] = skipped.get("empty label set", 0) + 1
            skipped_ids.add(image_id)
            continue
        image = _find_image(images_dir, image_id)
        if image is None:
            raise UserError(f"{where}: image file {images_dir / image_id}.(jpg|jpeg|png) not found")
        mask = masks_dir / f"{image_id}.png"
        sal = sal_dir / f"{image_id}.png"
        samples[image_id] = Sample(
            image_id,
            image,
            labels,
            mask if mask.is_file() else None,
            sal if sal.is_file() else None,
        )
    if not samples:
        raise UserError(f"{labels_path}: no labelled images")

    splits_dir = root / "splits"
    splits: dict[str, list[Sample]] = {}
    if splits_dir.is_dir() and any(splits_dir.glob("*.txt")):
        for split_file in sorted(splits_dir.glob("*.txt")):
            ids = [check_id(i, str(split_file)) for i in _read_lines(split_file)]
            dup = _first_duplicate(ids)
            if dup is not None:
                raise UserError(f"{split_file}: duplicate image id '{dup}'")
            ids = [i for i in ids if i not in skipped_ids]  # skipped above, and counted
            missing = [i for i in ids if i not in samples]
            if missing:
                raise UserError(f"{split_file}: image id '{missing[0]}' is not in labels.csv")
            splits[split_file.stem] = [samples[i] for i in ids]
    else:
        splits["train"] = list(samples.values())
    warn_skipped(root, skipped)
    return Dataset(root, classes, splits, skipped)


# ---------------------------------------------------------------- PASCAL VOC


def _voc_labels_from_xml(path: Path) -> tuple[int, ...]:
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise UserError(f"{path}: invalid XML ({exc})") from None
    labels = set()
    for obj in tree.getroot().iter("object"):
        name = obj.find("name")
        if name is None:
            continue
        text = (name.text or "").strip()
        if text in VOC_CLASSES:
            labels.add(VOC_CLASSES.index(text) + 1)
    return tuple(sorted(labels))


def load_voc(root: Path, empty_labels: str = "skip") -> Dataset:
    """PASCAL VOC 2012. `root` is VOCdevkit/VOC2012 (or a folder containing it)."""
    if (root / "VOC2012").is_dir():
        root = root / "VOC2012"
    images_dir = root / "JPEGImages"
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: not found; data.root must be VOCdevkit/VOC2012")
    sets_dir = root / "ImageSets" / "Segmentation"
    split_files = sorted(sets_dir.glob("*.txt")) if sets_dir.is_dir() else []
    split_files += [p for p in (root / "train_aug.txt",) if p.is_file()]
    if not split_files:
        raise UserError(f"{sets_dir}: no split files (train.txt, val.txt, ...)")
    mask_dirs = [root / "SegmentationClass", root / "SegmentationClassAug"]
    sal_dir = root / "saliency"
    cache: dict[str, Sample | None] = {}
    skipped: dict[str, int] = {}
    splits: dict[str, list[Sample]] = {}
    for split_file in split_files:
        samples = []
        for raw in _read_lines(split_file):
            # SBD-style lists give "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png".
            first = raw.split()[0]
            image_id = check_id(Path(first).stem if "/" in first else first, str(split_file))
            if image_id not in cache:
                cache[image_id] = _voc_sample(
                    root,
                    image_id,
                    mask_dirs,
                    sal_dir,
                    skipped,
                    empty_labels,
                    split_file.stem == "test",
                )
            if cache[image_id] is not None:
                samples.append(cache[image_id])
        splits[split_file.stem] = samples
    warn_skipped(root, skipped)
    return Dataset(root, list(VOC_CLASSES), splits, skipped)


def _voc_sample(
    root: Path,
    image_id: str,
    mask_dirs: list[Path],
    sal_dir: Path,
    skipped: dict[str, int],
    empty_labels: str,
    is_test: bool,
) -> Sample | None:
    image = root / "JPEGImages" / f"{image_id}.jpg"
    if not image.is_file():
        raise UserError(f"{image}: image file not found")
    mask = next(
        (d / f"{image_id}.png" for d in mask_dirs if (d / f"{image_id}.png").is_file()), None
    )
    xml = root / "Annotations" / f"{image_id}.xml"
    if mask is not None:
        labels = _labels_from_mask(mask, len(VOC_CLASSES))
    elif xml.is_file():
        labels = _voc_labels_from_xml(xml)
    else:
        labels = ()
    if not labels and not is_test:
        if empty_labels == "error":
            raise UserError(f"{image}: image '{image_id}' has an empty label set")
        skipped["empty label set"] = skipped.get("empty label set", 0) + 1
        return None
    sal = sal_dir / f"{image_id}.png"
    return Sample(image_id, image, labels, mask, sal if sal.is_file() else None)


def load_dataset(data: DataConfig) -> Dataset:
    """The dataset the `data` settings name (format, root, empty_labels; coco: mask_cache)."""
    if data.root is None:
        raise UserError("config key 'data.root' is not set (the dataset folder)")
    root = Path(data.root)
    if data.format == "folder":
        return load_folder(root, data.empty_labels)
    if data.format == "voc":
        return load_voc(root, data.empty_labels)
    return load_coco(root, data.empty_labels, data.mask_cache, data.coco_crowd)
