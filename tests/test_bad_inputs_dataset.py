"""Bad dataset files through the command line: labels.csv, classes.txt and split files
(missing, not UTF-8, broken CSV, NUL bytes, unknown or duplicate names and ids), and the
duplicate checks at scale.

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from helpers import DEMO, check, refuse
from helpers import TINY_MINE as TINY

from aepsl.cli import main
from aepsl.errors import UserError

# ------------------------------------------------------------------ helpers


def rewrite_csv(root: Path, rows: list[str]) -> None:
    """New labels.csv rows; the split files go, so every row is in `train`."""
    (root / "labels.csv").write_text("\n".join(["image,labels", *rows]) + "\n")
    shutil.rmtree(root / "splits")


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


# ------------------------------------------------------------------ issue 15: hostile files


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


@pytest.mark.parametrize("command", ["mine", "labels", "train", "run"])
def test_an_empty_training_split_is_one_line(capsys, tmp_path, data, command):
    """An empty split file: a ZeroDivisionError in the schedule before."""
    (data / "splits" / "train.txt").write_text("")
    out = tmp_path / "run"
    argv = [command, DEMO, f"data.root={data}", *TINY, "--out", str(out)]
    refuse(
        capsys,
        tmp_path,
        argv,
        f"{data}: the training split 'train' (data.train_split) has no images",
        out=out,
    )
