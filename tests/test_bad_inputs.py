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

import gc
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder_dataset
from PIL import Image

from aepsl.cli import main
from aepsl.data.datasets import Sample, load_image
from aepsl.io import write_index_png
from aepsl.models import build_classifier
from aepsl.models.segnet import build_segnet

DEMO = str(Path(__file__).parent.parent / "configs" / "demo_tiny.yaml")
TINY = ["mine.epochs=1", "data.image_size=32", "mine.batch_size=4", "precision=fp32"]
# Checkpoint messages: today's wording, or the clearer one proposed in docs/bad_inputs.md.
UNREADABLE = re.compile(r"not a (loadable weights-only|readable PyTorch) checkpoint")
REFUSED = re.compile(r"not a loadable weights-only checkpoint|refused: loading it would run")


# ------------------------------------------------------------------ helpers


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`, less the `skip` subtree."""
    tree: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        tree[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else None
    return tree


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder inside tmp_path, so stray relative writes would be seen."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def data(tmp_path, cwd) -> Path:
    return make_folder_dataset(tmp_path / "data")


def refuse(
    capsys,
    tmp_path: Path,
    argv: list[str],
    *fragments: str,
    out: Path | None = None,
    tolerate: tuple[type[Warning], ...] = (),
) -> str:
    """Run the CLI and check the bad-input contract; returns the error line."""
    before = snapshot(tmp_path, skip=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
        gc.collect()  # an unclosed file would warn here
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"aepsl {argv[0]}: error: "), line
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in line, line
    assert [str(w.message) for w in caught if not issubclass(w.category, tolerate)] == []
    assert snapshot(tmp_path, skip=out) == before, "something was written outside --out"
    return line


def check(capsys, tmp_path: Path, root: Path, *fragments: str, extra: tuple = (), **kw) -> str:
    argv = ["data-info", DEMO, f"data.root={root}", *extra, "--check"]
    return refuse(capsys, tmp_path, argv, *fragments, **kw)


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


class WritesMarker:
    """Unpickling this opens (creates) `path`: code execution if the loader allows it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


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
