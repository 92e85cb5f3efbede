"""MS COCO 2014 (`data.format: coco`): the official layout, semantic masks built once into a cache.

    ROOT/train2014/<file_name>                  images (split `train`)
    ROOT/val2014/<file_name>                    images (split `val`)
    ROOT/annotations/instances_train2014.json   instance annotations
    ROOT/annotations/instances_val2014.json
    ROOT/saliency/<id>.png                      optional saliency maps

Classes are the categories sorted by id (class k is the k-th; the official file's 80 give the
usual order, 1 person .. 80 toothbrush); 0 is background. An image's labels are the categories
of its non-crowd annotations; images without one are skipped (counted). Its id is the file
name without the extension (COCO_train2014_000000000009).

Masks are rasterised from the polygons (pycocotools) and RLEs (decoded here) the way the
field's COCO-to-VOC converter does it (alicranck/coco2voc, which ToCo and others point to):
objects by increasing area, a pixel keeps the first (smallest) object that covers it, so small
objects stay on top of the large ones they overlap. Crowd regions (`iscrowd: 1`) are painted
with their category like any object, as coco2voc does (`data.coco_crowd: class`), or are 255
(ignore) where no object covers them (`data.coco_crowd: ignore`). Image labels are the
categories of the non-crowd annotations either way.

The dataset folder is never written to. Masks go to `data.mask_cache` or, by default, to
`$XDG_CACHE_HOME/aepsl/coco_masks` (`~/.cache/aepsl/coco_masks`), in one folder per annotation
file (`train2014-<hash of its path>/`). `index.json`, written last, records the annotation
file's size and mtime, the classes and each image's labels: later loads read it instead of the
annotation file, and rebuild everything when the file has changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from aepsl.data.types import Dataset, Sample, check_id, short, warn_skipped
from aepsl.errors import UserError
from aepsl.io import max_pixels, read_header, write_index_png, write_json
from aepsl.labelmap import IGNORE

CACHE_VERSION = 1  # bump when the rasterisation changes: every cache is rebuilt
SPLITS = {"train": "train2014", "val": "val2014"}


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aepsl" / "coco_masks"


def cache_folder(cache_root: Path, annotation: Path, crowd: str = "class") -> Path:
    """The cache of one annotation file: `<split folder>-<hash of the file's absolute path>`,
    `-crowd-ignored` added for data.coco_crowd=ignore's masks."""
    name = annotation.stem.removeprefix("instances_")
    digest = hashlib.sha256(str(annotation.resolve()).encode("utf-8")).hexdigest()[:12]
    return cache_root / f"{name}-{digest}{'-crowd-ignored' if crowd == 'ignore' else ''}"


def load_coco(
    root: Path, empty_labels: str = "skip", mask_cache: str | None = None, crowd: str = "class"
) -> Dataset:
    """COCO 2014 at `root`, its masks built once into `mask_cache` (None: the default cache),
    crowd regions painted with their category (`crowd` class) or 255 (ignore)."""
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    ann_dir = root / "annotations"
    found = [
        (split, folder)
        for split, folder in SPLITS.items()
        if (ann_dir / f"instances_{folder}.json").is_file()
    ]
    if not found:
        raise UserError(
            f"{ann_dir}: no instances_train2014.json or instances_val2014.json (data.root must "
            "be the COCO 2014 folder holding train2014/, val2014/ and annotations/)"
        )
    cache_root = Path(mask_cache).expanduser() if mask_cache else default_cache_root()
    if cache_root.resolve().is_relative_to(root.resolve()):
        raise UserError(
            f"{cache_root}: data.mask_cache lies inside the dataset folder {root}; aepsl never "
            "writes into a dataset: choose a folder outside it (or leave it unset)"
        )
    sal_dir = root / "saliency"
    saliency = set(os.listdir(sal_dir)) if sal_dir.is_dir() else set()

    classes: list[str] | None = None
    first_ann: Path | None = None
    splits: dict[str, list[Sample]] = {}
    skipped: dict[str, int] = {}
    for split, folder in found:
        annotation = ann_dir / f"instances_{folder}.json"
        images_dir = root / folder
        if not images_dir.is_dir():
            raise UserError(f"{images_dir}: image folder not found (listed by {annotation})")
        index, masks_dir = _cached_index(annotation, images_dir, cache_root, crowd)
        if classes is None:
            classes, first_ann = index["classes"], annotation
        elif index["classes"] != classes:
            raise UserError(f"{annotation}: categories differ from those of {first_ann}")
        present = set(os.listdir(images_dir))
        samples = []
        for image_id, file_name, labels in index["images"]:
            if not labels:
                if empty_labels == "error":
                    raise UserError(
                        f"{annotation}: image '{file_name}' has an empty label set "
                        "(no non-crowd annotation)"
                    )
                skipped["empty label set"] = skipped.get("empty label set", 0) + 1
                continue
            if file_name not in present:
                raise UserError(f"{images_dir / file_name}: image file not found")
            sal = f"{image_id}.png"
            samples.append(
                Sample(
                    image_id,
                    images_dir / file_name,
                    tuple(labels),
                    masks_dir / f"{image_id}.png",
                    sal_dir / sal if sal in saliency else None,
                )
            )
        splits[split] = samples
    assert classes is not None
    warn_skipped(root, skipped)
    return Dataset(root, classes, splits, skipped)


# ---------------------------------------------------------------- the cache


def _stamp(annotation: Path, crowd: str) -> dict[str, Any]:
    stat = annotation.stat()
    return {
        "version": CACHE_VERSION,
        "crowd": crowd,
        "annotation": str(annotation.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def _read_index(path: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The cached index if it was built from this very annotation file, else None."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("stamp") != stamp:
        return None
    classes, images = index.get("classes"), index.get("images")
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        return None
    if not isinstance(images, list) or not all(_index_entry(e, len(classes)) for e in images):
        return None  # damaged with its stamp intact: rebuilt, as a changed file is
    return index


def _index_entry(entry: Any, classes: int) -> bool:
    """[image id, file name, labels 1..classes]: one image of a cached index."""
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], str)
        and isinstance(entry[2], list)
        and all(_is_int(k) and 1 <= k <= classes for k in entry[2])
    )


def _cached_index(
    annotation: Path, images_dir: Path, cache_root: Path, crowd: str
) -> tuple[dict[str, Any], Path]:
    folder = cache_folder(cache_root, annotation, crowd)
    masks_dir = folder / "masks"
    index_path = folder / "index.json"
    stamp = _stamp(annotation, crowd)
    index = _read_index(index_path, stamp)
    if index is not None and not _missing_masks(index, masks_dir):
        return index, masks_dir
    try:
        masks_dir.mkdir(parents=True, exist_ok=True)
        with _locked(folder / ".lock"):
            # Another process (a distributed rank) may have built it while this one waited.
            index = _read_index(index_path, stamp)
            if index is not None and not _missing_masks(index, masks_dir):
                return index, masks_dir
            only = _missing_masks(index, masks_dir) if index is not None else None
            if index is None:
                index_path.unlink(missing_ok=True)  # an interrupted rebuild is never taken as done
            index = _build(annotation, images_dir, masks_dir, stamp, only)
            write_json(index_path, index)
    except OSError as exc:
        raise UserError(
            f"{folder}: cannot write the COCO mask cache ({exc.strerror or exc}); set "
            "data.mask_cache to a writable folder"
        ) from None
    return index, masks_dir


def _missing_masks(index: dict[str, Any], masks_dir: Path) -> set[str]:
    have = set(os.listdir(masks_dir)) if masks_dir.is_dir() else set()
    return {i for i, _, labels in index["images"] if labels and f"{i}.png" not in have}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` where the OS has flock (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builders write the same files atomically
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- building


def _read_annotation(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except RecursionError:  # a few KB of [[[[...]]]] nests deeper than the parser's stack
        raise UserError(f"{path}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a COCO annotation file (expected a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: not a COCO annotation file (no '{key}' list)")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _classes(path: Path, categories: list[Any]) -> tuple[list[str], dict[int, int]]:
    """Class names and {category id: class index 1..C}, in the order of the category ids."""
    seen: dict[int, str] = {}
    for cat in categories:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise UserError(f"{path}: a category without an integer 'id'")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise UserError(f"{path}: category {cat['id']} has no printable 'name'")
        if cat["id"] in seen:
            raise UserError(f"{path}: category id {cat['id']} is listed twice")
        if name.strip().lower() == "background":  # label 0: its scores would be the background's
            raise UserError(f"{path}: category {cat['id']} is named 'background', label 0's name")
        if name.strip() in seen.values():  # per-class scores are keyed by name
            raise UserError(f"{path}: two categories are named '{name.strip()}'")
        seen[cat["id"]] = name.strip()
    if not seen:
        raise UserError(f"{path}: lists no categories")
    if len(seen) >= IGNORE:
        raise UserError(f"{path}: {len(seen)} categories; at most 254 fit in an index PNG")
    ids = sorted(seen)
    return [seen[i] for i in ids], {cat_id: k + 1 for k, cat_id in enumerate(ids)}


def _build(
    annotation: Path,
    images_dir: Path,
    masks_dir: Path,
    stamp: dict[str, Any],
    only: set[str] | None,
) -> dict[str, Any]:
    """Read the annotation file, write the masks (all, or the `only` ones missing) and return
    the index to cache."""
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise UserError(
            "data.format=coco needs pycocotools to read the masks: pip install pycocotools"
        ) from None

    data = _read_annotation(annotation)
    classes, cat_index = _classes(annotation, data["categories"])
    images: dict[int, dict[str, Any]] = {}
    ids: set[str] = set()
    entries = []
    for img in data["images"]:
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise UserError(f"{annotation}: an image without an integer 'id'")
        where = f"{annotation}: image {img['id']}"
        file_name = img.get("file_name")
        if not isinstance(file_name, str):
            raise UserError(f"{where}: no 'file_name'")
        check_id(file_name, where)
        image_id = check_id(Path(file_name).stem, where)
        height, width = img.get("height"), img.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise UserError(f"{where}: 'height' and 'width' must be positive integers")
        if height * width > max_pixels():
            raise UserError(
                f"{where}: image is {width}x{height} ({width * height} pixels), "
                f"over data.max_pixels={max_pixels()}"
            )
        if img["id"] in images:
            raise UserError(f"{where}: image id listed twice")
        if image_id in ids:
            raise UserError(f"{where}: a second image named '{image_id}'")
        images[img["id"]] = img
        ids.add(image_id)
        entries.append((img["id"], image_id, file_name))

    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise UserError(f"{annotation}: an annotation is not a JSON object")
        where = f"{annotation}: annotation {ann.get('id')}"
        for key in ("image_id", "category_id"):  # a list would be unhashable: a traceback
            if not _is_int(ann.get(key)):
                raise UserError(f"{where}: {key} {short(repr(ann.get(key)), 40)} is not an integer")
        if ann.get("image_id") not in by_image:
            raise UserError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_index:
            raise UserError(f"{where}: category_id {ann.get('category_id')!r} is not listed")
        by_image[ann["image_id"]].append(ann)
    del data

    listed = []
    for coco_id, image_id, file_name in tqdm(
        entries, desc=f"COCO masks {annotation.stem}", unit="img", dynamic_ncols=True
    ):
        anns = by_image[coco_id]
        labels = sorted({cat_index[a["category_id"]] for a in anns if not a.get("iscrowd")})
        listed.append([image_id, file_name, labels])
        if not labels or (only is not None and image_id not in only):
            continue
        img = images[coco_id]
        shape = (img["height"], img["width"])
        mask = rasterise(anns, shape, cat_index, stamp["crowd"], annotation, mask_api)
        mask = _orient(mask, images_dir / file_name, annotation)
        write_index_png(masks_dir / f"{image_id}.png", mask)
    if only is None:  # masks of images the file no longer lists
        keep = {f"{i}.png" for i, _, labels in listed if labels}
        for name in os.listdir(masks_dir):
            if name.endswith(".png") and name not in keep:
                (masks_dir / name).unlink(missing_ok=True)
    return {"stamp": stamp, "classes": classes, "images": listed}


def rasterise(
    anns: list[dict[str, Any]],
    shape: tuple[int, int],
    cat_index: dict[int, int],
    crowd: str = "class",
    source: Path | str = "annotations",
    mask_api: Any = None,
) -> np.ndarray:
    """One image's semantic mask of `shape` (height, width): objects by increasing area (ties
    in file order), each pixel keeping the first object that covers it. Crowd regions (`crowd`
    class, as coco2voc) are objects like the others; (ignore) 255 where no object covers them."""
    if mask_api is None:
        from pycocotools import mask as mask_api
    height, width = shape
    mask = np.zeros(shape, np.uint8)
    painted = anns if crowd == "class" else [a for a in anns if not a.get("iscrowd")]
    ignored = [] if crowd == "class" else [a for a in anns if a.get("iscrowd")]
    decoded = [(a, _decode(a, height, width, source, mask_api)) for a in painted]
    decoded.sort(key=lambda pair: _area(pair[0], pair[1]))  # stable: ties keep file order
    for ann, region in decoded:
        mask[region & (mask == 0)] = cat_index[ann["category_id"]]
    for ann in ignored:
        region = _decode(ann, height, width, source, mask_api)
        mask[region & (mask == 0)] = IGNORE
    return mask


def _area(ann: dict[str, Any], region: np.ndarray) -> float:
    """The annotation's `area` (as coco2voc sorts), or its pixel count when it has none."""
    area = ann.get("area")
    if isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area):
        return float(area)
    return float(region.sum())


def _decode(
    ann: dict[str, Any], height: int, width: int, source: Path | str, mask_api: Any
) -> np.ndarray:
    """A boolean HxW mask from a polygon list, an uncompressed RLE or a compressed RLE."""
    where = f"{source}: annotation {ann.get('id')}"
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        polygons = []
        for poly in seg:
            if not isinstance(poly, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
            ):
                raise UserError(f"{where}: a polygon must be a list of numbers")
            if len(poly) % 2:
                raise UserError(f"{where}: a polygon has an odd number of coordinates")
            if len(poly) < 6:  # fewer than 3 points cover nothing (and 4 numbers read as a box)
                continue
            # pycocotools allocates by edge length: far-out or non-finite vertices are refused
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            inside = (-width <= xs) & (xs <= 2 * width) & (-height <= ys) & (ys <= 2 * height)
            if not inside.all():  # NaN and inf fail the comparisons too
                raise UserError(f"{where}: polygon vertices far outside the {width}x{height} image")
            polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((height, width), bool)
        rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
        counts = _counts_from_string(rle["counts"], where)
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and size == [height, width]):
            raise UserError(
                f"{where}: RLE size {size!r} is not the image's [height, width] [{height}, {width}]"
            )
        if isinstance(counts, str):
            counts = _counts_from_string(counts, where)
        elif isinstance(counts, list) and all(_is_int(c) and 0 <= c < 2**62 for c in counts):
            counts = np.asarray(counts, np.int64)
        else:
            raise UserError(f"{where}: RLE counts must be a string or non-negative integers")
    elif seg is None or seg == {}:
        return np.zeros((height, width), bool)
    else:
        raise UserError(f"{where}: 'segmentation' must be a polygon list or an RLE")
    total = int(counts.sum()) if counts.max(initial=0) <= height * width else -1
    if total != height * width:
        covered = f"{total} pixels" if total >= 0 else "more pixels than that"
        raise UserError(f"{where}: RLE counts cover {covered}, the image has {height * width}")
    # Runs alternate 0, 1, 0, ... over the pixels in column-major order. (pycocotools' own
    # decode writes past its buffer when the runs overrun the image, and warns under numpy 2.)
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(width, height).T


def _counts_from_string(text: str | bytes, where: str) -> np.ndarray:
    """Decode COCO's compressed RLE string (maskApi.c rleFrString) to run lengths, vectorised.

    Each number is 5-bit groups, low first, 0x20 set on all but the last, whose 0x10 is the
    sign; every number from the 4th on is a difference to the one two places before it."""
    try:
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    except UnicodeEncodeError:
        raise UserError(f"{where}: RLE string has a character outside '0'..'o'") from None
    chars = np.frombuffer(raw, np.uint8).astype(np.int64) - 48
    if ((chars < 0) | (chars >= 64)).any():
        raise UserError(f"{where}: RLE string has a character outside '0'..'o'")
    if not len(chars):
        return np.zeros(0, np.int64)
    more = (chars & 0x20) != 0
    if more[-1]:
        raise UserError(f"{where}: RLE string ends inside a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits: far over any image's pixel count
        raise UserError(f"{where}: RLE string has a number too long")
    shift = 5 * (np.arange(len(chars)) - np.repeat(starts, lengths))
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])  # counts[3] = x3 + counts[1], ...
    counts[2::2] = np.cumsum(values[2::2])  # counts[4] = x4 + counts[2], ...
    if (counts < 0).any():
        raise UserError(f"{where}: RLE string decodes to a negative run")
    return counts


# EXIF orientation -> the transpose that puts the stored pixels upright (Pillow's exif_transpose)
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orient(mask: np.ndarray, image_path: Path, annotation: Path) -> np.ndarray:
    """Turn the mask the way the reader turns the image (EXIF orientation), so they agree.

    Annotations whose size matches the stored bitmap are in its frame and are turned; those
    matching the upright size of a 90-degree-tagged image already are upright."""
    with read_header(image_path) as image:
        stored = image.size  # (width, height)
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:  # a corrupt EXIF block: read_image ignores it too
            orientation = 1
    height, width = mask.shape
    if orientation not in _TRANSPOSE:
        orientation = 1
    if stored == (width, height):
        if orientation == 1:
            return mask
        return np.asarray(Image.fromarray(mask).transpose(_TRANSPOSE[orientation]))
    if orientation in (5, 6, 7, 8) and stored == (height, width):
        return mask  # annotated upright already
    raise UserError(
        f"{image_path}: image is {stored[0]}x{stored[1]} but {annotation.name} gives "
        f"{width}x{height}"
    )
