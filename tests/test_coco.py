"""`data.format: coco`: a tiny COCO 2014 written here, masks checked pixel for pixel against
arrays drawn by hand (rectilinear polygons with integer vertices: pixel (r, c) is inside when its
centre (c + 0.5, r + 0.5) is), the cache, and the whole pipeline on it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO
from PIL import Image

from aepsl.cli import main
from aepsl.config import DataConfig
from aepsl.data.coco import cache_folder, default_cache_root
from aepsl.data.datasets import load_dataset, load_image, load_mask, validate
from aepsl.errors import UserError
from aepsl.io import read_index_png

pytest.importorskip("pycocotools")

W, H = 32, 24
PERSON, CAR, TOOTHBRUSH = 1, 2, 3  # category ids 1, 3, 90 sorted


# ---------------------------------------------------------------- an independent encoder


def inside_polygon(poly: list[float], height: int = H, width: int = W) -> np.ndarray:
    """Even-odd test of each pixel centre: the expected mask of a polygon, not pycocotools'."""
    xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
    cy, cx = np.mgrid[:height, :width] + 0.5
    inside = np.zeros((height, width), bool)
    for i in range(len(xs)):
        x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        crosses = (y0 > cy) != (y1 > cy)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (cy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (cx < x_at)
    return inside


def rle_counts(region: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, starting with zeros."""
    flat = region.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return counts


def rle_string(region: np.ndarray) -> str:
    """The compressed form (maskApi.c rleToString), written here from the counts."""
    counts = rle_counts(region)
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def box(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def region(rows: slice, cols: slice) -> np.ndarray:
    out = np.zeros((H, W), bool)
    out[rows, cols] = True
    return out


# ---------------------------------------------------------------- the fixture

L_SHAPE = [24, 10, 30, 10, 30, 12, 26, 12, 26, 14, 24, 14]
TOOTH = region(slice(4, 10), slice(6, 14))
CROWD = region(slice(0, 12), slice(0, 16))
CAR_RLE = region(slice(5, 11), slice(5, 13))  # 48 pixels, as the person box below


def _ann(ann_id, image_id, cat, seg, area, crowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": seg,
        "area": area,
        "bbox": [0, 0, 1, 1],
        "iscrowd": crowd,
    }


def train_json(car_box=(10, 8, 18, 14)) -> dict:
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W}
        for i in (9, 25, 30, 31, 40)
    ]
    anns = [
        # image 9: a small car listed before the big person: the car stays on top anyway
        _ann(101, 9, 3, [box(*car_box)], 48.0),
        _ann(102, 9, 1, [box(2, 2, 22, 20)], 360.0),
        _ann(103, 9, 1, [box(24, 2, 30, 6), box(24, 16, 28, 22), L_SHAPE], 64.0),
        # image 25: toothbrush as uncompressed RLE under a crowd of people (compressed RLE)
        _ann(201, 25, 90, {"size": [H, W], "counts": rle_counts(TOOTH)}, 48.0),
        _ann(202, 25, 1, {"size": [H, W], "counts": rle_string(CROWD)}, 192.0, crowd=1),
        # image 30: a crowd only, no label; image 31: no annotation
        _ann(301, 30, 3, [box(0, 0, 8, 8)], 64.0, crowd=1),
        # image 40: equal areas: the one listed first wins the overlap
        _ann(401, 40, 3, {"size": [H, W], "counts": rle_string(CAR_RLE)}, 48.0),
        _ann(402, 40, 1, [box(8, 8, 16, 14)], 48.0),
        # a degenerate polygon (two points) adds nothing
        _ann(403, 40, 1, [[1, 1, 3, 3]], 0.0),
    ]
    categories = [
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
    return {"images": images, "annotations": anns, "categories": categories}


def val_json() -> dict:
    images = [
        {"id": 50, "file_name": "COCO_val2014_000000000050.jpg", "height": H, "width": W},
        {"id": 51, "file_name": "COCO_val2014_000000000051.jpg", "height": H, "width": W},
        {"id": 52, "file_name": "COCO_val2014_000000000052.jpg", "height": H, "width": W},
    ]
    anns = [
        _ann(501, 50, 90, [box(4, 2, 12, 10)], 64.0),  # image 50 is EXIF-rotated
        _ann(511, 51, 1, [box(6, 6, 26, 18)], 240.0),
        _ann(512, 51, 3, {"size": [H, W], "counts": rle_string(CAR_RLE)}, 48.0),
    ]
    categories = [
        {"id": 1, "name": "person"},
        {"id": 3, "name": "car"},
        {"id": 90, "name": "toothbrush"},
    ]
    return {"images": images, "annotations": anns, "categories": categories}


def expected_masks(crowd: str = "class") -> dict[str, np.ndarray]:
    m9 = np.zeros((H, W), np.uint8)
    m9[2:20, 2:22] = PERSON
    m9[8:14, 10:18] = CAR
    m9[2:6, 24:30] = PERSON
    m9[16:22, 24:28] = PERSON
    m9[10:12, 24:30] = PERSON  # the L
    m9[12:14, 24:26] = PERSON
    m25 = np.zeros((H, W), np.uint8)
    m25[0:12, 0:16] = PERSON if crowd == "class" else 255  # the crowd: coco2voc paints it
    m25[4:10, 6:14] = TOOTHBRUSH
    m40 = np.zeros((H, W), np.uint8)
    m40[8:14, 8:16] = PERSON
    m40[5:11, 5:13] = CAR  # listed first, same area: on top
    m50 = np.zeros((H, W), np.uint8)
    m50[2:10, 4:12] = TOOTHBRUSH
    m50 = np.rot90(m50, -1)  # EXIF orientation 6: the reader turns the image clockwise
    m51 = np.zeros((H, W), np.uint8)
    m51[6:18, 6:26] = PERSON
    m51[5:11, 5:13] = CAR
    return {
        "COCO_train2014_000000000009": m9,
        "COCO_train2014_000000000025": m25,
        "COCO_train2014_000000000040": m40,
        "COCO_val2014_000000000050": m50,
        "COCO_val2014_000000000051": m51,
    }


def make_coco(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder, data in (("train2014", train_json()), ("val2014", val_json())):
        (root / folder).mkdir(parents=True)
        for img in data["images"]:
            pixels = rng.integers(0, 80, (H, W, 3), dtype=np.uint8)
            exif = None
            if img["id"] == 50:
                pixels[2:10, 4:12] = 250  # where the toothbrush is, in the stored frame
                exif = Image.Exif()
                exif[0x0112] = 6
            kwargs = {"exif": exif.tobytes()} if exif is not None else {}
            Image.fromarray(pixels).save(root / folder / img["file_name"], quality=95, **kwargs)
        write_annotation(root, folder, data)
    return root


def write_annotation(root: Path, folder: str, data: dict) -> Path:
    path = root / "annotations" / f"instances_{folder}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def _load(root: Path, cache: Path, empty_labels: str = "skip", crowd: str = "class"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = {"format": "coco", "root": str(root), "mask_cache": str(cache)}
        data = load_dataset(DataConfig(**settings, empty_labels=empty_labels, coco_crowd=crowd))
    return data, [str(w.message) for w in caught]


# ---------------------------------------------------------------- the reader


def test_own_encoders_agree_with_pycocotools():
    """The test's expected arrays do not come from pycocotools; its decoder reads them back."""
    from pycocotools import mask as mask_api

    for shape in (TOOTH, CROWD, CAR_RLE):
        rle = {"size": [H, W], "counts": rle_string(shape).encode()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its decode under numpy 2
            assert np.array_equal(mask_api.decode(rle).astype(bool), shape)
        assert mask_api.frPyObjects({"size": [H, W], "counts": rle_counts(shape)}, H, W) == rle
    assert np.array_equal(inside_polygon(box(2, 2, 22, 20)), region(slice(2, 20), slice(2, 22)))
    expected = np.zeros((H, W), bool)
    expected[10:12, 24:30] = expected[12:14, 24:26] = True
    assert np.array_equal(inside_polygon(L_SHAPE), expected)


def test_rle_strings_decode_as_pycocotools_encodes_them():
    """Our vectorised reader of compressed RLEs against pycocotools' writer: random masks, big
    runs (several 5-bit groups, negative differences), empty and full masks."""
    from pycocotools import mask as mask_api

    from aepsl.data.coco import _counts_from_string

    rng = np.random.default_rng(0)
    shapes = [np.zeros((H, W), bool), np.ones((H, W), bool), rng.random((H, W)) < 0.5]
    big = np.zeros((300, 400), bool)
    big[20:280, 30:390] = True
    big[100:110, 50:60] = False
    shapes += [big, rng.random((300, 400)) < 0.01, rng.random((7, 5)) < 0.3]
    for shape in shapes:
        encoded = mask_api.encode(np.asfortranarray(shape.astype(np.uint8)))["counts"]
        counts = _counts_from_string(encoded, "test")
        assert counts.tolist() == rle_counts(shape)
        assert rle_string(shape) == encoded.decode()


@pytest.mark.parametrize("crowd", ["class", "ignore"])
def test_classes_labels_masks_and_skipped(coco, tmp_path, crowd):
    before = snapshot(coco)
    data, messages = _load(coco, tmp_path / "cache", crowd=crowd)
    assert data.classes == ["person", "car", "toothbrush"]
    assert data.num_classes == 3
    assert data.skipped == {"empty label set": 3}  # 30 (crowd only), 31, and val's 52
    assert any("skipped 3 image(s) with empty label set" in m for m in messages)
    labels = {s.id: s.labels for split in ("train", "val") for s in data.split(split)}
    assert labels == {
        "COCO_train2014_000000000009": (PERSON, CAR),
        "COCO_train2014_000000000025": (TOOTHBRUSH,),  # the crowd of people is no label
        "COCO_train2014_000000000040": (PERSON, CAR),
        "COCO_val2014_000000000050": (TOOTHBRUSH,),
        "COCO_val2014_000000000051": (PERSON, CAR),
    }
    assert [s.id for s in data.split("train")] == [
        "COCO_train2014_000000000009",
        "COCO_train2014_000000000025",
        "COCO_train2014_000000000040",
    ]
    expected = expected_masks(crowd)
    for split in ("train", "val"):
        for sample in data.split(split):
            assert sample.image.parent == coco / f"{split}2014"
            image = load_image(sample)
            mask = load_mask(sample, image.shape[:2], data.num_classes)
            assert np.array_equal(mask, expected[sample.id]), sample.id
    # the rotated image's bright block lies under the rotated mask
    sample = data.split("val")[0]
    image = load_image(sample)
    assert image.shape[:2] == (W, H)
    bright = image.mean(axis=2) > 200
    assert np.array_equal(bright, expected[sample.id] == TOOTHBRUSH)
    validate(data, "train")
    assert snapshot(coco) == before  # the dataset folder is read-only


def test_empty_labels_error(coco, tmp_path):
    with pytest.raises(UserError, match=r"instances_train2014\.json: image 'COCO_train2014_0+30"):
        _load(coco, tmp_path / "cache", empty_labels="error")


def test_cache_reused_then_rebuilt_when_the_annotations_change(coco, tmp_path):
    cache = tmp_path / "cache"
    data, _ = _load(coco, cache)
    folder = cache_folder(cache, coco / "annotations" / "instances_train2014.json")
    assert folder.name.startswith("train2014-")
    files = [*sorted(folder.rglob("*.png")), folder / "index.json"]
    assert len(files) == 3 + 1
    times = {p: p.stat().st_mtime_ns for p in files}
    again, _ = _load(coco, cache)
    assert {p: p.stat().st_mtime_ns for p in files} == times  # nothing rewritten
    assert again.split("train") == data.split("train")

    # a mask deleted by hand is rebuilt, the others left alone
    lost = folder / "masks" / "COCO_train2014_000000000040.png"
    lost.unlink()
    _load(coco, cache)
    assert np.array_equal(read_index_png(lost), expected_masks()[lost.stem])
    assert (folder / "masks" / "COCO_train2014_000000000009.png").stat().st_mtime_ns == times[
        folder / "masks" / "COCO_train2014_000000000009.png"
    ]

    # the car moves: every mask is rebuilt from the new file
    path = write_annotation(coco, "train2014", train_json(car_box=(12, 8, 20, 14)))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    moved, _ = _load(coco, cache)
    sample = moved.split("train")[0]
    mask = load_mask(sample, (H, W), 3)
    expected = expected_masks()[sample.id]
    expected[8:14, 10:18] = PERSON
    expected[8:14, 12:20] = CAR
    assert np.array_equal(mask, expected)
    index = json.loads((folder / "index.json").read_text())
    assert index["stamp"]["mtime_ns"] == path.stat().st_mtime_ns


def test_default_cache_is_per_user_never_the_dataset(coco, tmp_path, monkeypatch):

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = snapshot(coco)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_dataset(DataConfig(format="coco", root=str(coco)))
    assert default_cache_root() == tmp_path / "xdg" / "aepsl" / "coco_masks"
    assert data.split("train")[0].mask.is_relative_to(default_cache_root())
    assert snapshot(coco) == before


def test_mask_cache_setting_reaches_the_reader(coco, tmp_path):
    """load_dataset takes the data settings: data.mask_cache reaches the COCO reader."""
    from aepsl.config import load_config

    config = load_config(
        None, ["data.format=coco", f"data.root={coco}", f"data.mask_cache={tmp_path / 'set'}"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_dataset(config.data)
    assert data.split("val")[0].mask.is_relative_to(tmp_path / "set")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["annotations"][0].update(category_id=7), "category_id 7 is not listed"),
        (lambda d: d["annotations"][0].update(image_id=999), "image_id 999 is not in 'images'"),
        (
            lambda d: d["annotations"][3]["segmentation"].update(counts=[5, 3]),
            "RLE counts cover 8 pixels, the image has 768",
        ),
        (
            lambda d: d["annotations"][4]["segmentation"].update(counts="~~"),
            "character outside",
        ),
        (
            lambda d: d["annotations"][3]["segmentation"].update(size=[W, H]),
            r"RLE size \[32, 24\] is not the image's",
        ),
        (
            lambda d: d["annotations"][1].update(segmentation=[[0, 0, 1e9, 0, 1e9, 5]]),
            "far outside",
        ),
        (lambda d: d["images"][0].update(file_name="../x.jpg"), "not a plain file name"),
        (lambda d: d["categories"].append({"id": 1, "name": "again"}), "listed twice"),
        (
            lambda d: d["categories"].append({"id": 77, "name": "Background"}),
            "category 77 is named 'background', label 0's name",
        ),
        (
            lambda d: d["categories"].append({"id": 78, "name": d["categories"][0]["name"]}),
            "two categories are named",
        ),
        (lambda d: d.update(images=[{"id": [9]}]), "image without an integer 'id'"),
        (lambda d: d["annotations"][0].update(image_id=[9]), r"image_id \[9\] is not an integer"),
        (lambda d: d["annotations"][0].update(category_id=None), "category_id None is not an"),
        (lambda d: d.pop("annotations"), "no 'annotations' list"),
    ],
)
def test_bad_annotations_are_one_line_errors(coco, tmp_path, change, message):
    data = train_json()
    change(data)
    write_annotation(coco, "train2014", data)
    with pytest.raises(UserError, match=message):
        _load(coco, tmp_path / "cache")


def test_unwritable_cache_is_one_line_error(coco, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write the COCO mask cache.*data\.mask_cache"):
        _load(coco, blocker)


def test_missing_layout_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no instances_train2014\.json or instances_val2014"):
        _load(tmp_path / "empty", tmp_path / "cache")


def test_missing_image_is_named(coco, tmp_path):
    (coco / "val2014" / "COCO_val2014_000000000051.jpg").unlink()
    with pytest.raises(UserError, match=r"COCO_val2014_000000000051\.jpg: "):
        _load(coco, tmp_path / "cache")


# ---------------------------------------------------------------- the commands


def test_data_info(coco, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["data-info", DEMO, "data.format=coco", f"data.root={coco}", f"data.mask_cache={cache}"]
    assert main([*argv, "--check"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out
    assert "skipped: 3 image(s) with empty label set" in out
    assert "all images and masks decode and agree in size" in out


def test_run_through_every_stage(coco, tmp_path):
    before = snapshot(coco)
    out = tmp_path / "run"
    argv = [
        "run",
        DEMO,
        "data.format=coco",
        f"data.root={coco}",
        f"data.mask_cache={tmp_path / 'cache'}",
        "model.backbone=tiny",
        "data.image_size=32",
        "mine.steps=2",
        "mine.epochs=1",
        "mine.batch_size=2",
        "mine.visualise=1",
        "labels.visualise=1",
        "train.iterations=2",
        "train.batch_size=2",
        "train.crop_size=32",
        "train.checkpoint_every=2",
        "precision=fp32",
        "crf.workers=1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    for name, mask in expected_masks().items():
        folders = ("mine/regions", "labels") if "train2014" in name else ("predict",)
        for folder in folders:
            written = read_index_png(out / folder / f"{name}.png")
            assert written.shape == mask.shape, (folder, name)  # the rotated one too
            assert set(np.unique(written)) <= {0, 1, 2, 3, 255}
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    per_class = metrics["without_crf"]["per_class"]
    assert list(per_class) == ["background", "person", "car", "toothbrush"]
    assert metrics["without_crf"]["pixels"] == 2 * H * W  # val images 50 and 51
    assert snapshot(coco) == before


def test_preset_loads():
    from aepsl.config import load_config

    config = load_config(Path(DEMO).parent / "coco_vgg16.yaml")
    assert config.data.format == "coco"
    assert (config.data.train_split, config.data.val_split) == ("train", "val")
    assert config.mine.steps == 3


def test_a_mask_cache_inside_the_dataset_is_refused(coco):
    before = snapshot(coco)
    with pytest.raises(UserError, match=r"data\.mask_cache lies inside the dataset folder"):
        _load(coco, coco / "masks_cache")
    assert snapshot(coco) == before


def test_deeply_nested_json_is_one_line(coco, tmp_path):
    """A few KB of [[[[...]]]] overflowed the parser's stack: a RecursionError traceback."""
    (coco / "annotations" / "instances_train2014.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"invalid JSON \(nested too deeply\)"):
        _load(coco, tmp_path / "cache")


def test_a_damaged_index_with_its_stamp_intact_is_rebuilt(coco, tmp_path):
    """index.json whose entries are of the wrong shape (a traceback before) is rebuilt."""
    cache = tmp_path / "cache"
    _load(coco, cache)
    index_path = (
        cache_folder(cache, coco / "annotations" / "instances_train2014.json") / "index.json"
    )
    index = json.loads(index_path.read_text())
    good = index["images"]
    index["images"] = [entry[:2] for entry in good]
    index_path.write_text(json.dumps(index))
    data, _ = _load(coco, cache)
    assert json.loads(index_path.read_text())["images"] == good
    assert data.split("train")
