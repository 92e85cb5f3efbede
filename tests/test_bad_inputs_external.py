"""Bad inputs made elsewhere, read by the labels and mine stages: saliency maps, CAM files
(IRN's .npy, ours .npz: missing, unreadable, of the wrong form or size, non-finite, or
pickles that would run code) and folders of finished pseudo labels.

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.
"""

from __future__ import annotations

import io
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, WritesMarker, refuse
from helpers import TINY_MINE as TINY
from PIL import Image

from aepsl.data.datasets import Sample
from aepsl.errors import UserError
from aepsl.io import read_index_png, write_index_png

# ------------------------------------------------------------------ saliency maps (saliency.dir)


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
        (_truncate, "pickle exhausted before end of frame"),
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


class _DeclaresHuge:
    """Pickles as numpy.ndarray((40000, 40000), float32): 6 GB asked for by 400 bytes."""

    def __reduce__(self):
        return (np.ndarray, ((40000, 40000), np.dtype(np.float32)))


@pytest.mark.parametrize("kind", ["ndarray", "tensor-view"])
def test_a_cam_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path, data, kind):
    """Under a 3 GiB data limit (RLIMIT_DATA), so a regression fails the test instead of
    taking the machine's memory: a traceback (MemoryError) or an out-of-memory kill before."""
    import resource
    import subprocess
    import sys

    cams = tmp_path / "cams"
    cams.mkdir()
    if kind == "ndarray":
        value = {"keys": np.array([0]), "high_res": _DeclaresHuge()}
    else:  # 20 x 40000 x 40000 over a single float: strides of 0
        big = torch.zeros(1).expand(20, 40000, 40000)
        value = {"keys": torch.tensor([0]), "cam": big, "high_res": big}
    for image in (data / "images").iterdir():
        np.save(cams / f"{image.stem}.npy", np.array(value, dtype=object), allow_pickle=True)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))

    argv = ["labels", DEMO, f"data.root={data}", f"labels.cams_dir={cams}"]
    result = subprocess.run(
        [sys.executable, "-m", "aepsl", *argv, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 2, result.stderr[-1000:]
    assert len(lines) == 1, result.stderr
    assert "more values than CAMs of this data set can hold" in lines[0]
    assert "refused before reading it" in lines[0]


@pytest.mark.parametrize("key", ["mine.step1_cams", "labels.dir"])
def test_an_input_inside_the_stage_folder_it_would_empty_is_refused(capsys, tmp_path, data, key):
    """The changed setting emptied the stage folder, input included, and then the files were
    said to be missing."""
    out = tmp_path / "run"
    stage = "mine" if key == "mine.step1_cams" else "labels"
    inside = out / stage / "theirs"
    inside.mkdir(parents=True)
    (inside / "keep.txt").write_text("theirs")
    (out / stage / "manifest.json").write_text('{"settings_hash": "0", "complete": true}')
    argv = [stage, DEMO, f"data.root={data}", *TINY, f"{key}={inside}", "--out", str(out)]
    refuse(capsys, tmp_path, argv, f"{inside}: {key} lies inside {out / stage}", out=out)
    assert (inside / "keep.txt").read_text() == "theirs"


def test_images_inside_the_prediction_folder_are_refused(capsys, tmp_path, data):
    out = tmp_path / "pred"
    images = out / "images"
    shutil.copytree(data / "images", images)
    from aepsl.models.saved import model_record
    from aepsl.models.segnet import build_segnet

    model = tmp_path / "model.pt"
    torch.save(model_record(build_segnet("tiny", "none", 2), "segnet", "tiny", 2), model)
    argv = ["predict", DEMO, "--checkpoint", str(model), "--images", str(images)]
    refuse(capsys, tmp_path, [*argv, "--out", str(out)], "--images lies inside", out=out)
    assert len(list(images.iterdir())) == len(list((data / "images").iterdir()))


@pytest.mark.parametrize(
    "content",
    [
        {"keys": np.array(["a"]), "high_res": ZEROS},
        {"keys": None, "high_res": ZEROS},
        {"keys": np.array([0]), "high_res": [[0.0, 1.0], [0.0]]},
        {"keys": np.array([0]), "high_res": np.array([["x", "y"]])},
        {0: ZEROS[0], 1: np.zeros((16, 16), np.float32)},
    ],
    ids=["string-keys", "none-keys", "ragged-map", "text-map", "seam-two-shapes"],
)
def test_npy_cam_dict_of_the_wrong_types_is_one_line(capsys, tmp_path, data, content):
    """Each was a traceback (ValueError or TypeError from numpy)."""
    cams = irn_cams(tmp_path / "cams")
    np.save(cams / "img0.npy", np.array(content, dtype=object), allow_pickle=True)
    message = external(capsys, tmp_path, data, f"labels.cams_dir={cams}")
    assert message.startswith(f"{cams / 'img0.npy'}: CAM dict with values of the wrong type (")
