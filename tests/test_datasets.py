"""Readers of the folder and VOC formats, and their clear errors on bad input."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepsl.config import DataConfig
from aepsl.data.datasets import VOC_CLASSES, load_dataset, load_folder, load_mask, validate
from aepsl.errors import UserError
from aepsl.io import read_image, write_index_png


def test_folder_reader(folder_dataset):
    data = load_folder(folder_dataset)
    assert data.classes == ["square", "disc"]
    assert [len(data.split(s)) for s in ("train", "val")] == [4, 2]
    first = data.split("train")[0]
    assert first.id == "img0" and first.labels == (1,)
    assert data.split("train")[1].labels == (2,)
    assert data.split("train")[2].labels == (1, 2)
    assert first.mask is not None and first.saliency is None
    validate(data, "train")


def test_folder_without_splits_puts_everything_in_train(folder_dataset):
    for f in (folder_dataset / "splits").iterdir():
        f.unlink()
    (folder_dataset / "splits").rmdir()
    data = load_folder(folder_dataset)
    assert list(data.splits) == ["train"] and len(data.split("train")) == 6


def test_unknown_split(folder_dataset):
    with pytest.raises(UserError, match="no split named 'test'"):
        load_folder(folder_dataset).split("test")


def _rewrite_csv(root: Path, rows: list[str]) -> None:
    (root / "labels.csv").write_text("\n".join(["image,labels", *rows]) + "\n")


@pytest.mark.parametrize(
    "rows, message",
    [
        (["img0,square", "img0,disc"], "duplicate image id 'img0'"),
        (["img0,cat"], "unknown class name 'cat'"),
        (["../img0,square"], "not a plain file name"),
        (["sub/img0,square"], "not a plain file name"),
        (["missing,square"], "image file .*missing.* not found"),
        (["img0,square,extra"], "expected 2 columns"),
    ],
)
def test_bad_labels_csv(folder_dataset, rows, message):
    _rewrite_csv(folder_dataset, rows)
    for f in (folder_dataset / "splits").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=message) as info:
        load_folder(folder_dataset)
    assert "labels.csv" in str(info.value)


def test_wrong_header_and_encoding(folder_dataset):
    (folder_dataset / "labels.csv").write_text("file,tags\nimg0,square\n")
    with pytest.raises(UserError, match="header must be 'image,labels'"):
        load_folder(folder_dataset)
    (folder_dataset / "labels.csv").write_bytes(b"image,labels\nimg0,squ\xe9re\n")
    with pytest.raises(UserError, match=r"labels\.csv: not UTF-8"):
        load_folder(folder_dataset)


def test_empty_label_set_skipped_or_error(folder_dataset):
    _rewrite_csv(folder_dataset, ["img0,square", "img1,"])
    for f in (folder_dataset / "splits").iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match="skipped 1 image"):
        data = load_folder(folder_dataset)
    assert data.skipped == {"empty label set": 1}
    assert [s.id for s in data.split("train")] == ["img0"]
    with pytest.raises(UserError, match="empty label set"):
        load_folder(folder_dataset, empty_labels="error")


def test_split_with_unknown_or_duplicate_id(folder_dataset):
    (folder_dataset / "splits" / "val.txt").write_text("img4\nnope\n")
    with pytest.raises(UserError, match=r"val\.txt: image id 'nope'"):
        load_folder(folder_dataset)
    (folder_dataset / "splits" / "val.txt").write_text("img4\nimg4\n")
    with pytest.raises(UserError, match="duplicate image id 'img4'"):
        load_folder(folder_dataset)


def test_missing_files(tmp_path, folder_dataset):
    with pytest.raises(UserError, match="dataset folder not found"):
        load_folder(tmp_path / "nowhere")
    (folder_dataset / "classes.txt").unlink()
    with pytest.raises(UserError, match=r"classes\.txt: missing"):
        load_folder(folder_dataset)
    with pytest.raises(UserError, match=r"data\.root"):
        load_dataset(DataConfig())


def test_mask_wrong_size_and_out_of_range(folder_dataset):
    data = load_folder(folder_dataset)
    sample = data.split("train")[0]
    write_index_png(sample.mask, np.zeros((10, 12), np.uint8))
    with pytest.raises(UserError, match=r"img0\.png: mask is 12x10 but its image is 32x32"):
        load_mask(sample, (32, 32), 2)
    write_index_png(sample.mask, np.full((32, 32), 7, np.uint8))
    with pytest.raises(UserError, match="label 7 is out of range"):
        load_mask(sample, (32, 32), 2)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00garbage", b"not an image"])
def test_corrupt_or_empty_image(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.png"):
        read_image(path)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match=r"cut\.jpg: cannot decode"):
        read_image(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_convert_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (9, 7, 3), np.uint8))
    image = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    image.save(path)
    out = read_image(path)
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(path)
    assert read_image(path).min() == 255


def test_exif_rotation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    image = Image.new("RGB", (20, 10), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(path, exif=exif)
    assert read_image(path).shape == (20, 10, 3)


def make_voc(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for d in (
        "JPEGImages",
        "SegmentationClass",
        "SegmentationClassAug",
        "Annotations",
        "ImageSets/Segmentation",
    ):
        (voc / d).mkdir(parents=True)
    ids = ["2007_000001", "2007_000002", "2008_000003"]
    for i, image_id in enumerate(ids):
        Image.new("RGB", (12, 8), (i * 50, 0, 0)).save(voc / "JPEGImages" / f"{image_id}.jpg")
    mask = np.zeros((8, 12), np.uint8)
    mask[2:5, 2:5] = 15  # person
    mask[0] = 255
    write_index_png(voc / "SegmentationClass" / "2007_000001.png", mask)
    mask2 = np.zeros((8, 12), np.uint8)
    mask2[1:3, 1:3] = 7  # car, only in SBD
    write_index_png(voc / "SegmentationClassAug" / "2007_000002.png", mask2)
    (voc / "Annotations" / "2008_000003.xml").write_text(
        "<annotation><object><name>dog</name></object><object><name>cat</name>"
        "<part><name>head</name></part></object></annotation>"
    )
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("2007_000001\n")
    (sets / "val.txt").write_text("2007_000002\n")
    (sets / "train_aug.txt").write_text(
        "/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
        "/JPEGImages/2007_000002.jpg /SegmentationClassAug/2007_000002.png\n2008_000003\n"
    )
    return root / "VOCdevkit"


def test_voc_reader(tmp_path):
    data = load_dataset(DataConfig(format="voc", root=str(make_voc(tmp_path))))
    assert data.classes == list(VOC_CLASSES)
    assert set(data.splits) == {"train", "val", "train_aug"}
    by_id = {s.id: s for s in data.split("train_aug")}
    assert by_id["2007_000001"].labels == (15,)
    assert by_id["2007_000001"].mask.parent.name == "SegmentationClass"
    assert by_id["2007_000002"].labels == (7,)
    assert by_id["2008_000003"].labels == (8, 12)  # from XML: cat, dog; the part is no object
    assert by_id["2008_000003"].mask is None
    validate(data, "train_aug")


def test_csv_rows_keep_their_line_numbers(folder_dataset):
    """A quoted field may span lines: errors still name the line the row starts on."""
    _rewrite_csv(folder_dataset, ['img0,"square\ndisc"', "img1,disc", "img1,square"])
    for f in (folder_dataset / "splits").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"labels\.csv:5: duplicate image id 'img1'"):
        load_folder(folder_dataset)


@pytest.mark.parametrize(
    "content, classes",
    [
        ("square\ndisc\n", ["square", "disc"]),
        ("\ufeffsquare\r\ndisc\r\n\r\n", ["square", "disc"]),  # BOM, CRLF, trailing blank line
        ("  square  \ndisc", ["square", "disc"]),  # surrounding spaces are not part of a name
    ],
)
def test_classes_txt_good(folder_dataset, content, classes):
    (folder_dataset / "classes.txt").write_text(content)
    assert load_folder(folder_dataset).classes == classes


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"classes\.txt: lists no classes"),
        ("\n\n", r"classes\.txt: lists no classes"),
        ("square\nbig disc\n", r"classes\.txt:2: class name 'big disc' contains a space"),
        ("square\n\ndisc\n", r"classes\.txt:2: empty class name"),
        ("disc\nsquare\ndisc\n", r"classes\.txt:3: class 'disc' is listed twice \(first on line 1"),
        ("_background_\nsquare\n", r"classes\.txt:1: '_background_' is listed as a class"),
    ],
)
def test_classes_txt_bad(folder_dataset, content, message):
    (folder_dataset / "classes.txt").write_text(content)
    with pytest.raises(UserError, match=message):
        load_folder(folder_dataset)


def test_image_size_refuses_an_oversized_header(tmp_path):
    """data-info's header-only size read applies data.max_pixels too (no decoding)."""
    import struct
    import zlib

    from aepsl.data.datasets import image_size

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    path = tmp_path / "big.png"
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match=r"big\.png: image has 900000000 pixels, over data\.max_"):
        image_size(path)


def test_overlong_id_is_refused(folder_dataset):
    _rewrite_csv(folder_dataset, ["img0,square", "a" * 241 + ",disc"])
    for f in (folder_dataset / "splits").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"labels\.csv:3: image id 'a{60}\.\.\.' is too long \(241"):
        load_folder(folder_dataset)
