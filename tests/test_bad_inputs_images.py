"""Bad images and masks through the command line: corrupt, truncated, empty, of the wrong
size, oversized or hostile; and the awkward good ones (modes, 16 bits, EXIF) that must load.

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.

Already covered elsewhere with these assertions, so not repeated here: per-mode image
conversion (L, RGBA, P, I;16, LA, CMYK), 16-bit scaling and EXIF rotation of `read_image`:
tests/test_datasets.py::test_image_modes_convert_to_rgb, ::test_sixteen_bit_is_scaled_not_clipped,
::test_exif_rotation_applied; the same cases through `load_image` and `data-info --check` are
below.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO, check, refuse, snapshot
from helpers import TINY_MINE as TINY
from PIL import Image

from aepsl.cli import main
from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import write_index_png

# ------------------------------------------------------------------ helpers


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
    """A command that sets data.max_pixels leaves the readers' limit as it found it."""
    from aepsl import io as aepsl_io

    before = aepsl_io.max_pixels()
    yield
    assert aepsl_io.max_pixels() == before


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


# ------------------------------------------------------------------ issue 15: messages


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
