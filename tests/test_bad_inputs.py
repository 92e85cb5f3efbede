"""Every bad input of the issue, through the command line (docs/bad_inputs.md is the table).

Each must end with exit status 2, exactly one line on stderr naming the file (or config key)
and the problem, no traceback, no warning, and nothing written outside `--out`: the whole test
folder (dataset, config files, checkpoints, the working directory) is compared before and after.

Already covered elsewhere with these assertions, so not repeated here:
- unknown config key on the command line: tests/test_cli.py::test_unknown_key_exits_2_with_one_line
- per-mode image conversion (L, RGBA, P, I;16, LA, CMYK), 16-bit scaling and EXIF rotation of
  `read_image`: tests/test_datasets.py::test_image_modes_convert_to_rgb,
  ::test_sixteen_bit_is_scaled_not_clipped, ::test_exif_rotation_applied; the same cases through
  `load_image` and `data-info --check` are below.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import posix
import re
import shutil
import stat
import struct
import subprocess
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, WritesMarker, check, refuse, snapshot
from helpers import TINY_MINE as TINY
from PIL import Image

from aepsl.cli import main
from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import read_index_png, write_index_png
from aepsl.models import build_classifier
from aepsl.models.saved import model_record
from aepsl.models.segnet import build_segnet

# Checkpoint messages: today's wording, or the clearer one proposed in docs/bad_inputs.md.
UNREADABLE = re.compile(r"not a (loadable weights-only|readable PyTorch) checkpoint")
REFUSED = re.compile(r"not a loadable weights-only checkpoint|refused: loading it would run")


# ------------------------------------------------------------------ helpers


def rewrite_csv(root: Path, rows: list[str]) -> None:
    """New labels.csv rows; the split files go, so every row is in `train`."""
    (root / "labels.csv").write_text("\n".join(["image,labels", *rows]) + "\n")
    shutil.rmtree(root / "splits")


def noise(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def as_jpeg(root: Path, image_id: str = "img0") -> Path:
    """Replace the image's PNG by a JPEG of the same size; returns its path."""
    (root / "images" / f"{image_id}.png").unlink()
    path = root / "images" / f"{image_id}.jpg"
    noise().save(path, quality=95)
    return path


# ------------------------------------------------------------------ images


def test_corrupt_png(capsys, tmp_path, data):
    path = data / "images" / "img0.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDRgarbage" * 4)
    check(capsys, tmp_path, data, f"{path}: cannot decode image")


def test_corrupt_png_pixel_data(capsys, tmp_path, data):
    """The header reads, the compressed pixels do not."""
    path = data / "images" / "img0.png"
    content = bytearray(path.read_bytes())
    start = content.find(b"IDAT") + 8
    content[start : start + 64] = bytes(range(64))
    path.write_bytes(bytes(content))
    check(capsys, tmp_path, data, f"{path}: cannot decode image")


def test_corrupt_jpeg(capsys, tmp_path, data):
    path = as_jpeg(data)
    content = path.read_bytes()
    path.write_bytes(content[:2] + bytes(range(256)) + content[258:])  # headers after SOI
    check(capsys, tmp_path, data, f"{path}: cannot decode image")


def test_truncated_png(capsys, tmp_path, data):
    path = data / "images" / "img0.png"
    noise().save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    check(capsys, tmp_path, data, f"{path}: cannot decode image", "truncated")


def _truncated_jpeg(root: Path) -> Path:
    path = as_jpeg(root)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def test_truncated_jpeg(capsys, tmp_path, data):
    """One line, and the decoder's file closed (no ResourceWarning as a second line)."""
    path = _truncated_jpeg(data)
    check(capsys, tmp_path, data, f"{path}: cannot decode image")


def test_zero_byte_image(capsys, tmp_path, data):
    path = data / "images" / "img0.png"
    path.write_bytes(b"")
    check(capsys, tmp_path, data, f"{path}: file is empty")


def test_corrupt_image_found_by_a_stage(capsys, tmp_path, data):
    """Without data-info --check the first stage finds it; only --out is written."""
    path = data / "images" / "img2.png"
    path.write_bytes(b"not an image")
    out = tmp_path / "run"
    argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(out)]
    refuse(capsys, tmp_path, argv, f"{path}: cannot decode image", out=out)


# ------------------------------------------------------------------ masks


def test_mask_of_the_wrong_size(capsys, tmp_path, data):
    path = data / "masks" / "img0.png"
    write_index_png(path, np.zeros((10, 12), np.uint8))
    check(capsys, tmp_path, data, f"{path}: mask is 12x10 but its image is 32x32")


@pytest.mark.parametrize("value", [3, 7, 254])
def test_mask_label_out_of_range(capsys, tmp_path, data, value):
    path = data / "masks" / "img0.png"
    mask = np.zeros((32, 32), np.uint8)
    mask[5, 5] = value
    write_index_png(path, mask)
    check(capsys, tmp_path, data, f"{path}: label {value} is out of range (0..2 or 255)")


def test_mask_not_an_index_png(capsys, tmp_path, data):
    path = data / "masks" / "img0.png"
    noise().save(path)
    check(capsys, tmp_path, data, f"{path}: label map must be a palette or greyscale PNG")


# ------------------------------------------------------------------ labels.csv, classes, ids


def test_unknown_class_name(capsys, tmp_path, data):
    rewrite_csv(data, ["img0,square", "img1,cat"])
    check(capsys, tmp_path, data, f"{data / 'labels.csv'}:3: unknown class name 'cat'")


def test_empty_label_set_is_skipped_and_counted(capsys, data):
    rewrite_csv(data, ["img0,square", "img1,", "img2,disc"])
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) with empty label set"):
        assert main(["data-info", DEMO, f"data.root={data}", "--check"]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 image(s) with empty label set" in out
    assert "all images and masks decode" in out


def test_empty_label_set_image_listed_in_a_split_is_skipped_too(capsys, tmp_path):
    from conftest import make_folder_dataset

    root = make_folder_dataset(tmp_path / "listed")  # splits list every id
    rows = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([*rows[:2], "img1,", *rows[3:]]) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) with empty label set"):
        assert main(["data-info", DEMO, f"data.root={root}"]) == 0
    assert "skipped: 1 image(s) with empty label set" in capsys.readouterr().out


def test_empty_label_set_is_an_error_when_asked(capsys, tmp_path, data):
    rewrite_csv(data, ["img0,square", "img1,"])
    check(
        capsys,
        tmp_path,
        data,
        f"{data / 'labels.csv'}:3: image 'img1' has an empty label set",
        extra=("data.empty_labels=error",),
    )


def test_duplicate_id_in_labels_csv(capsys, tmp_path, data):
    rewrite_csv(data, ["img0,square", "img1,disc", "img0,disc"])
    check(capsys, tmp_path, data, f"{data / 'labels.csv'}:4: duplicate image id 'img0'")


def test_duplicate_id_in_split_file(capsys, tmp_path, data):
    (data / "splits" / "val.txt").write_text("img4\nimg5\nimg4\n")
    check(capsys, tmp_path, data, f"{data / 'splits' / 'val.txt'}: duplicate image id 'img4'")


@pytest.mark.parametrize("image_id", ["..", "../img0", "sub/img0", "sub\\img0", "/etc/passwd"])
def test_id_that_is_not_a_plain_name(capsys, tmp_path, data, image_id):
    rewrite_csv(data, ["img0,square", f"{image_id},disc"])
    line = check(capsys, tmp_path, data, f"{data / 'labels.csv'}:3: image id ")
    assert line.endswith(f"{image_id!r} is not a plain file name")


def test_id_that_is_not_a_plain_name_in_split_file(capsys, tmp_path, data):
    (data / "splits" / "val.txt").write_text("img4\n../img5\n")
    check(capsys, tmp_path, data, "val.txt: image id '../img5' is not a plain file name")


def test_missing_image_file(capsys, tmp_path, data):
    rewrite_csv(data, ["img0,square", "ghost,disc"])
    check(
        capsys,
        tmp_path,
        data,
        f"{data / 'labels.csv'}:3: image file {data / 'images' / 'ghost'}.(jpg|jpeg|png) not found",
    )


def test_missing_classes_txt(capsys, tmp_path, data):
    (data / "classes.txt").unlink()
    check(capsys, tmp_path, data, f"{data / 'classes.txt'}: missing")


def test_missing_labels_csv(capsys, tmp_path, data):
    (data / "labels.csv").unlink()
    check(capsys, tmp_path, data, f"{data / 'labels.csv'}: missing (header 'image,labels')")


@pytest.mark.parametrize("name", ["labels.csv", "classes.txt", "splits/val.txt"])
def test_file_not_utf8(capsys, tmp_path, data, name):
    path = data / name
    path.write_bytes(path.read_bytes().replace(b"img4", b"img\xe94").replace(b"disc", b"d\xefsc"))
    check(capsys, tmp_path, data, f"{path}: not UTF-8 text (byte ")


@pytest.mark.parametrize(
    "content, got",
    [
        ("file,tags\nimg0,square\n", "file,tags"),
        ("img0,square\nimg1,disc\n", "img0,square"),  # no header at all
        ("image;labels\nimg0;square\n", "image;labels"),
        ("", "nothing"),
    ],
)
def test_csv_with_wrong_header(capsys, tmp_path, data, content, got):
    (data / "labels.csv").write_text(content)
    check(
        capsys,
        tmp_path,
        data,
        f"{data / 'labels.csv'}: header must be 'image,labels', got '{got}'",
    )


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.threshold=2", "config key 'mine.threshold': Input should be less than 1 (got 2)"),
        ("mine.threshold=0", "config key 'mine.threshold': Input should be greater than 0"),
        ("mine.steps=abc", "config key 'mine.steps': Input should be a valid integer"),
        ("mine.steps=0", "config key 'mine.steps': Input should be greater than or equal to 1"),
        ("mine.cam_flip=maybe", "config key 'mine.cam_flip': Input should be a valid boolean"),
        (
            "precision=fp64",
            "config key 'precision': Input should be 'auto', 'fp32', 'bf16' or 'fp16'",
        ),
        ("data.empty_labels=ignore", "config key 'data.empty_labels'"),
        ("mine=3", "config key 'mine' must be a section (mapping)"),
    ],
)
def test_config_value_of_wrong_type_or_range(capsys, tmp_path, data, override, message):
    argv = ["data-info", DEMO, f"data.root={data}", override, "--check"]
    refuse(capsys, tmp_path, argv, f"command line: {message}")


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_config_file_wrong_value_and_unknown_key(capsys, tmp_path, data):
    path = _config_file(tmp_path, "mine:\n  threshold: high\n")
    argv = ["data-info", str(path), f"data.root={data}", "--check"]
    refuse(capsys, tmp_path, argv, f"{path}: config key 'mine.threshold': Input should be")
    path.write_text("mine:\n  thresold: 0.5\n")
    refuse(
        capsys,
        tmp_path,
        argv,
        f"{path}: unknown config key 'mine.thresold'; did you mean 'mine.threshold'?",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("mine:\n  steps: [3\n", "invalid YAML at line 3, column 1 (expected ',' or ']'"),
        ("mine:\n\tsteps: 3\n", "invalid YAML at line 2, column 1 (found character '\\t'"),
        ("- 1\n- 2\n", "config file must be a mapping"),
    ],
)
def test_config_file_not_valid_yaml(capsys, tmp_path, data, text, message):
    path = _config_file(tmp_path, text)
    refuse(capsys, tmp_path, ["data-info", str(path), f"data.root={data}"], f"{path}: {message}")


def test_config_file_not_utf8(capsys, tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    refuse(
        capsys,
        tmp_path,
        ["data-info", str(path), f"data.root={data}"],
        f"{path}: cannot read config file",
    )


@pytest.mark.parametrize(
    "template",
    [
        "seed: !!python/object/apply:os.system ['touch {marker}']\n",
        "seed: !!python/object/apply:subprocess.call [['touch', '{marker}']]\n",
    ],
)
def test_config_file_with_python_tag_is_refused(capsys, tmp_path, data, template):
    marker = tmp_path / "pwned"
    path = _config_file(tmp_path, template.format(marker=marker))
    refuse(
        capsys,
        tmp_path,
        ["data-info", str(path), f"data.root={data}"],
        f"{path}: invalid YAML at line 1, column 7",
        "could not determine a constructor for the tag",
    )
    assert not marker.exists()


# ------------------------------------------------------------------ output folder


@pytest.mark.parametrize("under", [False, True], ids=["out-is-a-file", "out-under-a-file"])
def test_output_folder_that_cannot_be_written(capsys, tmp_path, data, under):
    """Extends tests/test_cli.py::test_output_folder_not_writable with the full contract."""
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    out = blocker / "run" if under else blocker
    argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(out)]
    problem = "is not writable" if under else "is an existing file, not a folder"
    refuse(capsys, tmp_path, argv, f"{out}: output folder {problem}")
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes through chmod 0o500; the file cases above cover the refusal",
)
def test_output_folder_without_write_permission(capsys, tmp_path, data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = ["mine", DEMO, f"data.root={data}", *TINY, "--out", str(locked / "run")]
        refuse(capsys, tmp_path, argv, f"{locked / 'run'}: output folder is not writable")
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ checkpoints


class Custom:
    """A class a weights-only loader must not import."""

    def __init__(self) -> None:
        self.value = 1


def predict(capsys, tmp_path: Path, data: Path, checkpoint: Path, *fragments: str) -> str:
    out = tmp_path / "pred"
    argv = ["predict", DEMO, "--checkpoint", str(checkpoint), "--images", str(data / "images")]
    line = refuse(capsys, tmp_path, [*argv, "--out", str(out)], f"{checkpoint}: ", *fragments)
    assert not out.exists()
    return line


def _segnet_state() -> dict[str, torch.Tensor]:
    return build_segnet("tiny", "none", 2).state_dict()


@pytest.mark.parametrize("kind", ["garbage", "text", "empty", "truncated"])
def test_unreadable_checkpoint(capsys, tmp_path, data, kind):
    path = tmp_path / "model.pt"
    if kind == "truncated":
        torch.save(_segnet_state(), path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(
            {"garbage": bytes(range(256)), "text": b"not a checkpoint\n" * 20, "empty": b""}[kind]
        )
    line = predict(capsys, tmp_path, data, path)
    assert UNREADABLE.search(line), line


def test_checkpoint_that_is_a_tensor(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save(torch.zeros(3, 4), path)
    predict(capsys, tmp_path, data, path, "checkpoint is not a dictionary of tensors")


@pytest.mark.parametrize("kind", ["foreign", "classifier"])
def test_checkpoint_of_another_model(capsys, tmp_path, data, kind):
    """A dict of tensors that is not a segmentation network (e.g. mine's classifier.pt)."""
    path = tmp_path / "model.pt"
    state = (
        {"encoder.weight": torch.zeros(2, 2)}
        if kind == "foreign"
        else build_classifier("tiny", "none", 2).state_dict()
    )
    torch.save(state, path)
    predict(capsys, tmp_path, data, path, "not an aepsl segmentation checkpoint (model.pt)")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_checkpoint_whose_keys_do_not_fit(capsys, tmp_path, data, change):
    state = _segnet_state()
    if change == "missing":
        del state["head.0.weight"]
    elif change == "unexpected":
        state["extra.weight"] = torch.zeros(1)
    else:
        state["head.0.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    expected = {"missing": "Missing key(s)", "unexpected": "Unexpected key(s)", "shape": "size"}
    predict(capsys, tmp_path, data, path, "does not fit model.backbone=tiny", expected[change])


def test_checkpoint_with_a_custom_class_is_refused(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save({**_segnet_state(), "extra": Custom()}, path)
    line = predict(capsys, tmp_path, data, path)
    assert REFUSED.search(line), line


def test_checkpoint_that_runs_code_is_refused(capsys, tmp_path, data):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({**_segnet_state(), "extra": WritesMarker(marker)}, path)
    # The payload is live: an unsafe load would create the marker (checked on a copy elsewhere).
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    probe.mkdir()
    torch.save({"extra": WritesMarker(probe / "pwned")}, probe / "model.pt")
    torch.load(probe / "model.pt", weights_only=False)
    assert (probe / "pwned").exists()
    shutil.rmtree(probe)

    line = predict(capsys, tmp_path, data, path)
    assert REFUSED.search(line), line
    assert not marker.exists()


def test_checkpoint_refusal_names_the_class(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save({"extra": WritesMarker(tmp_path / "pwned")}, path)
    line = predict(capsys, tmp_path, data, path)
    assert "io.open" in line and "\x1b" not in line and "weights_only" not in line


# ------------------------------------------------------------------ good inputs


def _modes(root: Path) -> dict[str, tuple[int, int]]:
    """Write one image per awkward mode into `root/images`; returns id -> loaded (H, W)."""
    rgb = noise(seed=3)
    sizes = {}
    for image_id, image in {
        "grey": rgb.convert("L"),
        "rgba": rgb.convert("RGBA"),
        "palette": rgb.convert("P"),
        "deep": Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257),
    }.items():
        image.save(root / "images" / f"{image_id}.png")
        sizes[image_id] = (32, 32)
    rotated = Image.new("RGB", (20, 10), (200, 10, 10))  # stored 20 wide, 10 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 10 wide, 20 high
    rotated.save(root / "images" / "rotated.jpg", exif=exif)
    sizes["rotated"] = (20, 10)
    grey_jpeg = rgb.convert("L")
    grey_jpeg.save(root / "images" / "greyjpeg.jpg")
    sizes["greyjpeg"] = (32, 32)
    return sizes


def test_good_image_modes_load_through_load_image(tmp_path):
    (tmp_path / "images").mkdir()
    for image_id, (height, width) in _modes(tmp_path).items():
        path = next((tmp_path / "images").glob(f"{image_id}.*"))
        array = load_image(Sample(image_id, path, (1,)))
        assert array.shape == (height, width, 3) and array.dtype == np.uint8, image_id
    deep = load_image(Sample("deep", tmp_path / "images" / "deep.png", (1,)))
    grey = load_image(Sample("grey", tmp_path / "images" / "grey.png", (1,)))
    assert np.array_equal(deep, grey)  # 16-bit scaled to 8 bits, not clipped


def test_good_image_modes_pass_data_info_check(capsys, tmp_path, data):
    sizes = _modes(data)
    for image_id, shape in sizes.items():
        write_index_png(data / "masks" / f"{image_id}.png", np.zeros(shape, np.uint8))
    ids = "\n".join(sizes)
    (data / "splits" / "val.txt").write_text(f"img4\n{ids}\n")
    with (data / "labels.csv").open("a") as csv:
        csv.write("".join(f"{image_id},square\n" for image_id in sizes))
    before = snapshot(tmp_path)
    assert main(["data-info", DEMO, f"data.root={data}", "--check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "all images and masks decode and agree in size" in captured.out
    assert "height 20-32, width 10-32" in captured.out  # the rotated JPEG, after rotation
    assert snapshot(tmp_path) == before


def test_exif_rotated_mask_must_match_the_rotated_image(capsys, tmp_path, data):
    _modes(data)
    path = data / "masks" / "rotated.png"
    write_index_png(path, np.zeros((10, 20), np.uint8))  # the stored, unrotated size
    with (data / "labels.csv").open("a") as csv:
        csv.write("rotated,square\n")
    (data / "splits" / "val.txt").write_text("img4\nrotated\n")
    check(capsys, tmp_path, data, f"{path}: mask is 20x10 but its image is 10x20")


# ------------------------------------------------------------------ issue 15: hostile files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, extra: bytes = b"") -> bytes:
    """A valid PNG header for a greyscale image of width x height, with four rows of pixel data:
    a few hundred bytes that ask for width x height bytes once decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + extra
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 32x32 JPEG whose frame header (SOF0) is patched to claim width x height."""
    buffer = io.BytesIO()
    noise().save(buffer, format="JPEG", quality=90)
    content = bytearray(buffer.getvalue())
    sof = content.find(b"\xff\xc0")
    content[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(content)


@pytest.fixture
def pixel_limit():
    """Restore the readers' pixel limit after a test that sets data.max_pixels."""
    from aepsl import io as aepsl_io

    yield
    aepsl_io.set_max_pixels(40_000_000)


TEXT_BOMB = zlib.compress(b"a" * 50_000_000)  # 49 KB that inflate to 50 MB


@pytest.mark.parametrize(
    "kind, message",
    [
        # over data.max_pixels (40 M), under Pillow's warning limit (89 M)
        ("png-9000", "image is 9000x9000 (81000000 pixels), over data.max_pixels=40000000"),
        # over Pillow's warning limit: its warning is not a second line, our check refuses
        ("png-10000", "image is 10000x10000 (100000000 pixels), over data.max_pixels=40000000"),
        # over twice Pillow's limit: its DecompressionBombError, in our words
        ("png-20000", "image has 400000000 pixels, over data.max_pixels=40000000"),
        ("jpeg-9000", "image is 9000x9000 (81000000 pixels), over data.max_pixels=40000000"),
        ("mask-9000", "image is 9000x9000 (81000000 pixels), over data.max_pixels=40000000"),
        ("ztxt-bomb", "cannot decode image (Decompressed data too large"),
        ("iccp-bomb", "cannot decode image (Decompressed data too large"),
        ("no-check", "image is 9000x9000 (81000000 pixels), over data.max_pixels=40000000"),
        ("limit-setting", "image is 32x32 (1024 pixels), over data.max_pixels=1000"),
    ],
)
def test_hostile_or_oversized_image(capsys, tmp_path, data, pixel_limit, kind, message):
    """Refused from the header, before any pixel is decoded: one line naming file and size."""
    path = data / "images" / "img0.png"
    extra: tuple[str, ...] = ()
    if kind.startswith("png-") or kind == "no-check":
        side = 9000 if kind == "no-check" else int(kind.split("-")[1])
        path.write_bytes(png_claiming(side, side))
    elif kind == "jpeg-9000":
        path.unlink()
        path = data / "images" / "img0.jpg"
        path.write_bytes(jpeg_claiming(9000, 9000))
    elif kind == "mask-9000":
        path = data / "masks" / "img0.png"
        path.write_bytes(png_claiming(9000, 9000))
    elif kind.endswith("-bomb"):
        name = {"ztxt-bomb": b"zTXt", "iccp-bomb": b"iCCP"}[kind]
        path.write_bytes(png_claiming(32, 32, _chunk(name, b"key\x00\x00" + TEXT_BOMB)))
    else:
        extra = ("data.max_pixels=1000",)
    assert path.stat().st_size < 60_000
    if kind == "no-check":  # data-info reads image sizes from the headers even without --check
        argv = ["data-info", DEMO, f"data.root={data}"]
        line = refuse(capsys, tmp_path, argv, f"{path}: {message}")
    else:
        line = check(capsys, tmp_path, data, f"{path}: {message}", extra=extra)
    assert len(line) < 300


@pytest.mark.parametrize("reader", ["read_image", "read_index_png", "read_gray_png"])
def test_every_reader_checks_the_pixel_limit(tmp_path, reader):
    """Images, masks and label maps, saliency maps: the same header check."""
    import aepsl.io as aepsl_io

    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(9000, 9000))
    with pytest.raises(UserError) as info:
        getattr(aepsl_io, reader)(path)
    assert str(info.value) == (
        f"{path}: image is 9000x9000 (81000000 pixels), over data.max_pixels=40000000"
    )


def _set_row(root: Path, line: int, text: str) -> None:
    """Replace line `line` (1-based, the header is line 1) of labels.csv with `text`."""
    rows = (root / "labels.csv").read_text().splitlines()
    rows[line - 1] = text
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize(
    "name, line, text, message",
    [
        ("labels.csv", 3, "img1," + "d" * 200_000, ":3: broken CSV (field longer than 131072 "),
        ("labels.csv", 3, 'img1,"di"sc', ":3: broken CSV (',' expected after '\"')"),
        ("labels.csv", 3, 'img1,"disc', ":3: broken CSV (a quoted field is never closed)"),
        ("labels.csv", 4, "img2,square di\x00sc", ":4: NUL byte in a text file"),
        ("labels.csv", 3, "x" * 300 + ",disc", ":3: image id 'xxxxxxxxxx"),
        ("classes.txt", 2, "di\x00sc", ":2: NUL byte in a text file"),
        ("splits/val.txt", 2, "img\x005", ":2: NUL byte in a text file"),
    ],
)
def test_broken_text_files(capsys, tmp_path, data, name, line, text, message):
    """One line naming the file and the line, however long or odd the bad line is."""
    path = data / name
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")
    out = check(capsys, tmp_path, data, f"{path}{message}")
    assert len(out) < 300, out


@pytest.mark.parametrize(
    "content, message",
    [
        ("square\ntraffic light\n", ":2: class name 'traffic light' contains a space"),
        ("square\ndi\tsc\n", ":2: class name 'di\\tsc' contains a space or a control character"),
        ("square\n\ndisc\n", ":2: empty class name (one name per line, no blank lines)"),
        ("\nsquare\ndisc\n", ":1: empty class name"),
        ("square\ndisc\nsquare\n", ":3: class 'square' is listed twice (first on line 1)"),
        ("background\nsquare\ndisc\n", ":1: 'background' is listed as a class; background is"),
        ("square\n__background__\ndisc\n", ":2: '__background__' is listed as a class"),
        ("Background\nsquare\ndisc\n", ":1: 'Background' is listed as a class"),
        ("".join(f"c{i}\n" for i in range(300)), ":255: at most 254 classes fit in an index PNG"),
    ],
)
def test_bad_classes_txt(capsys, tmp_path, data, content, message):
    """Each of these would shift or merge class ids silently."""
    (data / "classes.txt").write_text(content)
    check(capsys, tmp_path, data, f"{data / 'classes.txt'}{message}")


def test_classes_txt_trailing_blank_lines_are_fine(capsys, data):
    (data / "classes.txt").write_text("square\ndisc\n\n  \n")
    assert main(["data-info", DEMO, f"data.root={data}"]) == 0
    assert "2 classes" in capsys.readouterr().out


ALIAS_BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
mine:
  cam_scales: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (ALIAS_BOMB, "invalid YAML at line 2, column 8 (alias *a is not allowed in a config file"),
        (
            "mine:\n  cam_scales: &s [1.0]\npredict:\n  scales: *s\n",
            "invalid YAML at line 4, column 11 (alias *s is not allowed in a config file",
        ),
        (
            "base: &base {steps: 2}\nmine:\n  <<: *base\n",
            "invalid YAML at line 3, column 7 (alias *base is not allowed",
        ),
        ("mine:\n  steps: " + "x" * 100_000 + "\n", "config key 'mine.steps': Input should be"),
        ("mine:\n  " + "k" * 1000 + ": 1\n", "unknown config key 'mine.kkkkkkkk"),
    ],
)
def test_config_file_bombs_give_a_short_line(capsys, tmp_path, data, text, message):
    """YAML aliases are refused (a 500-byte config would expand to millions of items), and no
    value is quoted at length."""
    path = _config_file(tmp_path, text)
    line = refuse(capsys, tmp_path, ["data-info", str(path), f"data.root={data}"], message)
    assert len(line) < 400, len(line)


# ------------------------------------------------------------------ issue 15: settings


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.cam_scales=[]", "config key 'mine.cam_scales': List should have at least 1 item"),
        ("mine.cam_scales=[0]", "config key 'mine.cam_scales.0': Input should be greater than 0"),
        ("mine.cam_scales=[1, -1]", "config key 'mine.cam_scales.1': Input should be greater"),
        ("mine.cam_scales=[15]", "config key 'mine.cam_scales.0': Input should be less than or"),
        ("predict.scales=[]", "config key 'predict.scales': List should have at least 1 item"),
        ("predict.scales=[0.5, 0]", "config key 'predict.scales.1': Input should be greater"),
        ("predict.scales=[.nan]", "config key 'predict.scales.0': Input should be a finite number"),
        (
            "train.scale_range=[1.3, 0.7]",
            "config key 'train.scale_range': must be (low, high) with low <= high (got [1.3, 0.7])",
        ),
        ("train.scale_range=[0, 1]", "config key 'train.scale_range.0': Input should be greater"),
        ("train.scale_range=[-1, 1]", "config key 'train.scale_range.0': Input should be greater"),
        ("train.scale_range=[1]", "config key 'train.scale_range.1': Field required"),
        ("seed=-1", "config key 'seed': Input should be greater than or equal to 0 (got -1)"),
        ("seed=4294967296", "config key 'seed': Input should be less than 4294967296"),
        ("mine.lr=.inf", "config key 'mine.lr': Input should be a finite number (got inf)"),
        ("train.lr=.nan", "config key 'train.lr': Input should be a finite number (got nan)"),
        ("data.root=", "config key 'data.root': must not be empty (the dataset folder)"),
        ("data.train_split=", "config key 'data.train_split': String should have at least 1"),
        ("data.max_pixels=0", "config key 'data.max_pixels': Input should be greater than or"),
        ("data.image_size=100000", "config key 'data.image_size': Input should be less than or"),
        ("data.num_workers=100000", "config key 'data.num_workers': Input should be less than"),
        ("crf.workers=100000", "config key 'crf.workers': Input should be less than or equal"),
        ("model.weights=", "config key 'model.weights': String should have at least 1 character"),
        (
            "train.psl_warmup=6000",  # a command-line length replaces the preset's epochs
            "config key 'train.psl_warmup': must be less than train.iterations (1200)",
        ),
    ],
)
def test_config_value_that_would_fail_later(capsys, tmp_path, data, override, message):
    """Each passed the schema before and crashed (or silently did nothing) in a stage."""
    argv = ["data-info", DEMO, f"data.root={data}", override, "--check"]
    if override.startswith("train.psl_warmup"):
        argv.insert(3, "train.iterations=1200")
    if override.startswith("data.root="):
        argv = ["data-info", DEMO, override, "--check"]
    refuse(capsys, tmp_path, argv, f"command line: {message}")


# ------------------------------------------------------------------ issue 15: scale


def test_duplicate_at_the_end_of_a_100001_line_split(capsys, tmp_path, data):
    """The duplicate check is one pass (it was quadratic: 103 s for this file)."""
    ids = [f"id{i}" for i in range(100_000)] + ["id5"]
    (data / "splits" / "val.txt").write_text("\n".join(ids) + "\n")
    start = time.perf_counter()
    check(capsys, tmp_path, data, f"{data / 'splits' / 'val.txt'}: duplicate image id 'id5'")
    print(f"100,001-line split checked in {time.perf_counter() - start:.2f} s")


def test_duplicate_image_id_in_a_large_image_folder(tmp_path):
    """predict --images: one pass over the ids too (20,001 files, the shared id sorts last)."""
    from aepsl.inference.predict import images_in

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20_000):
        (folder / f"a{i:05d}.png").touch()
    (folder / "zz.jpg").touch()
    (folder / "zz.png").touch()
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        images_in(folder)
    assert str(info.value) == f"{folder}: two images share the id 'zz'"
    print(f"20,002 files checked in {time.perf_counter() - start:.2f} s")


# ------------------------------------------------------------------ issue 15: durability


@pytest.mark.parametrize("writer", ["write_json", "write_text", "write_index_png", "checkpoint"])
def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch, writer):
    """fsync(file), then rename, then fsync(folder): a power cut leaves the old file or the
    whole new one, never an empty one."""
    import aepsl.io as aepsl_io

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(aepsl_io.os, "fsync", fsync)
    monkeypatch.setattr(aepsl_io.os, "replace", replace)
    target = tmp_path / "out" / "file"
    {
        "write_json": lambda: aepsl_io.write_json(target, {"a": 1}),
        "write_text": lambda: aepsl_io.write_text(target, "text"),
        "write_index_png": lambda: write_index_png(target, np.zeros((4, 4), np.uint8)),
        "checkpoint": lambda: aepsl_io.save_checkpoint(target, {"w": torch.zeros(2)}),
    }[writer]()
    assert events == ["fsync file", "rename", "fsync folder"]
    assert target.stat().st_size > 0
    assert [p.name for p in target.parent.iterdir()] == ["file"]


def test_failed_atomic_write_is_not_synced_nor_renamed(tmp_path, monkeypatch):
    import aepsl.io as aepsl_io

    events: list[str] = []
    monkeypatch.setattr(aepsl_io.os, "fsync", lambda fd: events.append("fsync"))
    target = tmp_path / "file"
    target.write_text("old")
    with pytest.raises(RuntimeError), aepsl_io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert events == [] and target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# ------------------------------------------------------------------ issue 15: messages


class Reduces:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.mark.parametrize(
    "function, how, name",
    [
        (os.system, "pickle-2", "posix.system"),
        (os.system, "torch.save", "posix.system"),
        (posix.system, "pickle-2", "posix.system"),
        (posix.system, "torch.save", "posix.system"),
        (os.system, "pickle-5", "posix.system"),  # STACK_GLOBAL: torch stops before naming it
        (subprocess.call, "pickle-2", "subprocess.call"),  # pickled as commands.call
        (builtins.eval, "torch.save", "builtins.eval"),
        (builtins.exec, "pickle-2", "builtins.exec"),
    ],
)
def test_checkpoint_that_would_run_a_command_is_refused(
    capsys, tmp_path, data, function, how, name
):
    """Refused in our words, never with torch's advice to load it with weights_only=False."""

    def live(marker: Path) -> Reduces:
        command = f"touch {marker}"
        if function is subprocess.call:
            return Reduces(function, command.split())
        if function in (builtins.eval, builtins.exec):
            return Reduces(function, f"open({str(marker)!r}, 'w').close()")
        return Reduces(function, command)

    # The payload is live: an unsafe load of a copy, outside tmp_path, runs the command.
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    probe.mkdir()
    pickle.loads(pickle.dumps(live(probe / "pwned"), protocol=2))
    assert (probe / "pwned").exists()
    shutil.rmtree(probe)

    marker = tmp_path / "pwned"
    payload = live(marker)
    path = tmp_path / "model.pt"
    if how == "torch.save":
        torch.save({"extra": payload, **_segnet_state()}, path)
    else:
        path.write_bytes(pickle.dumps({"extra": payload}, protocol=int(how.split("-")[1])))
    line = predict(
        capsys, tmp_path, data, path, f"refused: loading it would run Python code ({name}); "
    )
    assert "weights_only" not in line and "\x1b" not in line and "trust" not in line
    assert not marker.exists()


def test_saliency_map_of_the_wrong_size_names_the_file(tmp_path, data):
    from aepsl.config import load_config
    from aepsl.labels.stage import _background
    from aepsl.layout import RunLayout

    saliency = tmp_path / "maps"
    saliency.mkdir()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(saliency / "img0.png")
    config = load_config(
        DEMO, [f"data.root={data}", "saliency.source=dir", f"saliency.dir={saliency}"]
    )
    sample = Sample("img0", data / "images" / "img0.png", (1,))
    with pytest.raises(UserError) as info:
        _background(config, sample, (32, 32), RunLayout(tmp_path / "run", config), None)
    assert (
        str(info.value) == f"{saliency / 'img0.png'}: saliency map is 12x10 but its image is 32x32"
    )


def test_corrupt_exif_is_a_warning_naming_the_file(capsys, data):
    """Pillow warns "Corrupt EXIF data" without the file; the image itself is fine."""
    path = as_jpeg(data)
    image = Image.open(path).convert("RGB")
    exif = image.getexif()
    exif[0x0112], exif[0x010E] = 1, "x" * 50
    image.save(path, exif=exif, quality=95)
    content = bytearray(path.read_bytes())
    start = content.find(b"Exif\x00\x00") + 14
    content[start : start + 26] = b"\xff" * 26  # the IFD entries
    path.write_bytes(bytes(content))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["data-info", DEMO, f"data.root={data}", "--check"]) == 0
    assert caught and all(str(w.message).startswith(f"{path}: Corrupt EXIF") for w in caught)
    assert "all images and masks decode" in capsys.readouterr().out


# ------------------------------------------------------------------ CAMs and pseudo labels made
# elsewhere (external.py): labels.cams_dir, mine.step1_cams, labels.dir, mine.cam_format

CAM_KEYS = {"img0": [0], "img1": [1], "img2": [0, 1], "img3": [0]}  # the train split, 0-based


def irn_cams(folder: Path) -> Path:
    """IRN's per-image files (step/make_cam.py: a pickled dict) for the training split."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for image_id, keys in CAM_KEYS.items():
        maps = rng.random((len(keys), 32, 32)).astype(np.float32)
        np.save(folder / f"{image_id}.npy", {"keys": np.array(keys), "high_res": maps})
    return folder


def external(capsys, tmp_path: Path, data: Path, setting: str, command: str = "labels") -> str:
    """`aepsl labels` (or `mine`, one step: no training) with `setting`; the error line (after
    the stage's progress bar, which ends its line first)."""
    out = tmp_path / "run"
    argv = [command, DEMO, f"data.root={data}", *TINY, "mine.steps=1", setting, "--out", str(out)]
    line = refuse(capsys, tmp_path, argv, out=out, progress=True)
    return line.removeprefix(f"aepsl {command}: error: ")


class TorchStorage:
    """What a pickled tensor's storage reduces to: torch.storage._load_from_bytes(bytes), which
    torch itself runs with weights_only=False."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        import torch.storage

        return (torch.storage._load_from_bytes, (self.data,))


@pytest.mark.parametrize("kind", ["missing", "a file"])
@pytest.mark.parametrize(
    "command, key",
    [("labels", "labels.cams_dir"), ("mine", "mine.step1_cams"), ("labels", "labels.dir")],
)
def test_external_folder_not_found(capsys, tmp_path, data, command, key, kind):
    folder = tmp_path / "elsewhere"
    if kind == "a file":
        folder.write_text("not a folder\n")
    message = external(capsys, tmp_path, data, f"{key}={folder}", command)
    assert message == f"{folder}: folder not found"


@pytest.mark.parametrize("command", ["labels", "mine"])
def test_cam_file_missing(capsys, tmp_path, data, command):
    cams = irn_cams(tmp_path / "cams")
    (cams / "img1.npy").unlink()
    key = "labels.cams_dir" if command == "labels" else "mine.step1_cams"
    message = external(capsys, tmp_path, data, f"{key}={cams}", command)
    assert message == f"{cams / 'img1.npy'}: CAM file missing (nor .npz)"


@pytest.mark.parametrize("command", ["labels", "mine"])
def test_cam_file_of_the_wrong_size(capsys, tmp_path, data, command):
    cams = irn_cams(tmp_path / "cams")
    np.save(cams / "img0.npy", {"keys": np.array([0]), "high_res": np.zeros((1, 30, 32))})
    key = "labels.cams_dir" if command == "labels" else "mine.step1_cams"
    message = external(capsys, tmp_path, data, f"{key}={cams}", command)
    assert message == f"{cams / 'img0.npy'}: CAMs are 32x30 but the image is 32x32"


@pytest.mark.parametrize("kind", ["reduce", "tensor storage", "persistent id"])
def test_cam_file_that_would_run_code_is_refused(capsys, tmp_path, data, kind):
    cams = irn_cams(tmp_path / "cams")
    path = cams / "img0.npy"
    marker = tmp_path / "pwned"
    if kind == "persistent id":
        asks = "a persistent id"

        class Persistent(pickle.Pickler):
            def persistent_id(self, obj):
                return "ask the loader" if isinstance(obj, str) and obj == "keys" else None

        with path.open("wb") as stream:
            header = {"descr": "|O", "fortran_order": False, "shape": ()}
            np.lib.format.write_array_header_1_0(stream, header)
            Persistent(stream, protocol=3).dump({"keys": 0})
    else:
        payload = WritesMarker(marker)
        asks = "io.open"
        if kind == "tensor storage":  # torch's weights-only loader refuses it; said our way
            inner = io.BytesIO()
            torch.save(payload, inner)
            payload = TorchStorage(inner.getvalue())
        np.save(path, {"keys": payload, "high_res": np.zeros((1, 32, 32), np.float32)})
        live = tmp_path / "live.npy"  # the payload is live: np.load(allow_pickle=True) runs it
        shutil.copy(path, live)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.load(live, allow_pickle=True)
        assert marker.exists()
        marker.unlink()
        live.unlink()
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == (
        f"{path}: refused: its pickle asks for {asks}, which could run code; only arrays, "
        "dicts and tensors are read from a .npy"
    )
    assert "weights_only" not in message and not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _version_3(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[6] = 3  # the major version byte after b"\x93NUMPY"
    path.write_bytes(bytes(content))


def _header_shape(path: Path) -> None:
    """An object array of one dict whose header claims two."""
    array = np.empty(1, dtype=object)
    array[0] = {"keys": np.array([0]), "high_res": np.zeros((1, 32, 32), np.float32)}
    np.save(path, array, allow_pickle=True)
    content = path.read_bytes()
    path.write_bytes(content.replace(b"(1,)", b"(2,)", 1))


def _plain_truncated(path: Path) -> None:
    np.save(path, np.zeros((1, 32, 32), np.float32))
    _truncate(path)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (
            lambda p: p.write_bytes(b"not a numpy file at all"),
            "the magic string is not correct; expected b'\\x93NUMPY', got b'not a '",
        ),
        (lambda p: p.write_bytes(b""), "EOF: reading magic string, expected 8 bytes got 0"),
        (_truncate, "pickle data was truncated"),
        (
            _plain_truncated,
            "Failed to read all data for array. Expected (1, 32, 32) = 1024 elements, could "
            "only read 496 elements. (file seems not fully written?)",
        ),
        (_version_3, "unsupported .npy version (3, 0)"),
        (
            lambda p: np.save(p, {"keys": TorchStorage(b"garbage"), "high_res": None}),
            "a tensor's storage is not readable: Unsupported operand 103",
        ),
    ],
    ids=["garbage", "empty", "truncated", "truncated-array", "version-3", "tensor-garbage"],
)
def test_unreadable_npy_cam_file(capsys, tmp_path, data, damage, reason):
    cams = irn_cams(tmp_path / "cams")
    path = cams / "img0.npy"
    damage(path)
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == f"{path}: not a readable .npy file ({reason})"
    assert "weights_only" not in message and "\x1b" not in message


def test_npy_whose_header_disagrees_with_its_pickle(capsys, tmp_path, data):
    cams = irn_cams(tmp_path / "cams")
    _header_shape(cams / "img0.npy")
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == f"{cams / 'img0.npy'}: damaged .npy (shape (1,), header says (2,))"


ZEROS = np.zeros((1, 32, 32), np.float32)


@pytest.mark.parametrize(
    "content, problem",
    [
        (ZEROS, "not a CAM file: expected a dict saved with np.save"),
        (
            {"keys": np.array([0]), "cam": np.zeros((1, 4, 4), np.float32)},
            "CAM dict has no 'high_res' (IRN) or 'attn_highres' (CLIP-ES) entry; it holds keys, "
            "cam",
        ),
        ({"square": ZEROS[0]}, "not a CAM dict (IRN: keys, cam, high_res)"),
        (
            {"keys": np.array([0, 1]), "high_res": ZEROS},
            "2 class keys but CAMs of shape (1, 32, 32) (expected keys x height x width)",
        ),
        (
            {"keys": np.array([2]), "high_res": ZEROS},
            "class key 2 outside 0..1 (0-based, without background)",
        ),
        ({5: ZEROS[0]}, "class key 5 outside 0..1 (0-based, without background)"),  # SEAM's
    ],
    ids=["array", "no-high-res", "not-irn-nor-seam", "count", "irn-key", "seam-key"],
)
def test_npy_cam_file_of_the_wrong_form(capsys, tmp_path, data, content, problem):
    cams = irn_cams(tmp_path / "cams")
    np.save(cams / "img0.npy", content)
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == f"{cams / 'img0.npy'}: {problem}"


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


@pytest.mark.parametrize(
    "write, problem",
    [
        (
            _npz(cams=ZEROS),
            "not a CAM .npz with keys and cams ('keys is not a file in the archive')",
        ),
        (
            lambda p: p.write_bytes(b"garbage"),
            "not a CAM .npz with keys and cams (not a zip archive)",
        ),
        (lambda p: p.write_bytes(b""), "not a CAM .npz with keys and cams (not a zip archive)"),
        (
            lambda p: (_npz(keys=np.array([1], np.uint8), cams=ZEROS)(p), _truncate(p)),
            "not a CAM .npz with keys and cams (not a zip archive)",
        ),
        (
            _npz(keys=np.array([1], dtype=object), cams=ZEROS),
            "not a CAM .npz with keys and cams (Object arrays cannot be loaded when "
            "allow_pickle=False)",
        ),
        (_npz(keys=np.array([3], np.uint8), cams=ZEROS), "class key 3 outside 1..2"),
        (
            _npz(keys=np.array([1], np.uint8), cams=np.zeros((1, 16, 16), np.float16)),
            "CAMs are 16x16 but the image is 32x32",
        ),
    ],
    ids=["no-keys", "garbage", "empty", "truncated", "object-array", "key", "size"],
)
def test_npz_cam_file(capsys, tmp_path, data, write, problem):
    """Ours (mine.cam_format: npz): keys 1-based; numpy's advice to unpickle is not passed on."""
    cams = irn_cams(tmp_path / "cams")
    (cams / "img0.npy").unlink()
    write(cams / "img0.npz")
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == f"{cams / 'img0.npz'}: {problem}"


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_cams_are_refused(capsys, tmp_path, data, value):
    """Cleaning them would mine nothing (nan) or the whole image (inf) without a word."""
    cams = irn_cams(tmp_path / "cams")
    broken = np.zeros_like(ZEROS)
    broken[0, 2:4, 5] = value
    np.save(cams / "img0.npy", {"keys": np.array([0]), "high_res": broken})
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message == (
        f"{cams / 'img0.npy'}: the CAM of class 0 has 2 NaN or infinite values (did the "
        "network that made it diverge?)"
    )


def _pseudo_labels(data: Path, folder: Path) -> Path:
    shutil.copytree(data / "masks", folder)
    return folder


def _value_7(path: Path) -> None:
    label = read_index_png(path)
    label[3, 3] = 7
    write_index_png(path, label)


@pytest.mark.parametrize(
    "image_id, damage, problem",
    [
        ("img1", Path.unlink, "1 pseudo label missing, e.g. 'img1'"),
        (
            "img0",
            lambda p: write_index_png(p, np.zeros((10, 12), np.uint8)),
            "1 pseudo label of another size than their image, e.g. 'img0' (12x10, image 32x32)",
        ),
        ("img2", _value_7, "1 pseudo label with values outside 0..2 and 255, e.g. 'img2' (7)"),
        (
            "img0",
            lambda p: Image.new("RGB", (32, 32)).save(p),
            "1 pseudo label unreadable, e.g. 'img0' (label map must be a palette or greyscale "
            "PNG, got mode RGB)",
        ),
        (
            "img0",
            lambda p: p.write_bytes(b"garbage"),
            "1 pseudo label unreadable, e.g. 'img0' (cannot decode image (cannot identify ima",
        ),
    ],
    ids=["missing", "size", "value", "rgb", "garbage"],
)
def test_bad_pseudo_label_folder(capsys, tmp_path, data, image_id, damage, problem):
    theirs = _pseudo_labels(data, tmp_path / "theirs")
    damage(theirs / f"{image_id}.png")
    message = external(capsys, tmp_path, data, f"labels.dir={theirs}")
    assert message.startswith(f"{theirs}: {problem}"), message
    if "cannot decode" not in problem:  # the garbage one is clipped at 80 characters
        assert message == f"{theirs}: {problem}"


def test_several_kinds_of_bad_pseudo_labels_are_one_line(capsys, tmp_path, data):
    theirs = _pseudo_labels(data, tmp_path / "theirs")
    (theirs / "img1.png").unlink()
    write_index_png(theirs / "img0.png", np.zeros((10, 12), np.uint8))
    message = external(capsys, tmp_path, data, f"labels.dir={theirs}")
    assert message == (
        f"{theirs}: 1 pseudo label missing, e.g. 'img1'; 1 pseudo label of another size than "
        "their image, e.g. 'img0' (12x10, image 32x32)"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["labels.dir=theirs", "labels.cams_dir=cams"],
            "command line: config key 'labels.cams_dir': give labels.dir (finished pseudo "
            "labels) or labels.cams_dir, not both (got 'cams')",
        ),
        (
            ["mine.step1_cams="],
            "command line: config key 'mine.step1_cams': must not be empty (a folder of CAMs, or "
            "null) (got '')",
        ),
        (
            ["labels.dir="],
            "command line: config key 'labels.dir': must not be empty (a folder, or null) (got '')",
        ),
        (
            ["labels.cams_dir="],
            "command line: config key 'labels.cams_dir': must not be empty (a folder, or null) "
            "(got '')",
        ),
        (
            ["mine.cam_format=png"],
            "command line: config key 'mine.cam_format': Input should be 'npz' or 'irn' (got "
            "'png')",
        ),
    ],
    ids=["both", "empty-step1-cams", "empty-dir", "empty-cams-dir", "cam-format"],
)
def test_external_settings(capsys, tmp_path, data, overrides, message):
    argv = ["data-info", DEMO, f"data.root={data}", *overrides, "--check"]
    assert refuse(capsys, tmp_path, argv) == f"aepsl data-info: error: {message}"


def test_both_external_label_sources_in_a_config_file(capsys, tmp_path, data):
    config = _config_file(tmp_path, "labels:\n  dir: theirs\n  cams_dir: cams\n")
    argv = ["data-info", str(config), f"data.root={data}", "--check"]
    assert refuse(capsys, tmp_path, argv) == (
        f"aepsl data-info: error: {config}: config key 'labels.cams_dir': give labels.dir "
        "(finished pseudo labels) or labels.cams_dir, not both (got 'cams')"
    )


def test_checkpoint_of_another_class_count_on_a_split(capsys, tmp_path, data):
    """A network of 5 classes on a 2-class dataset would predict labels the dataset has not."""
    path = tmp_path / "model.pt"
    torch.save(model_record(build_segnet("tiny", "none", 5), "segnet", "tiny", 5), path)
    out = tmp_path / "pred"
    argv = ["predict", DEMO, f"data.root={data}", "--checkpoint", str(path), "--split", "train"]
    refuse(
        capsys, tmp_path, [*argv, "--out", str(out)], f"{path}: a network of 5 classes; ", "has 2"
    )
    assert not out.exists()
