"""CAMs and pseudo labels made elsewhere (IRN, SEAM, CLIP-ES, a SAM refiner, ...): read them
safely, write ours in the field's format, check a folder of pseudo labels, and digest a folder
so that changing its files re-runs the stages that read it.

CAM files, one per image, `<id>.npy` or `<id>.npz`:
- IRN (jiwoon-ahn/irn, step/make_cam.py): `np.save(<id>.npy, {"keys": valid_cat, "cam":
  strided_cam, "high_res": highres_cam})`, a dict pickled in a 0-d object array. `keys` are the
  image's classes without background, 0-based (VOC: 0 aeroplane .. 19 tvmonitor; its readers
  step/eval_cam.py and step/cam_to_ir_label.py pad `keys + 1` with 0 for background);
  `cam` is the CAM at stride 4 (K x h x w), `high_res` at image size (K x H x W), each class
  divided by its max (+1e-5). IRN stores `keys` and `cam` as torch tensors, `high_res` as an
  array. We write numpy arrays throughout, `cam` at the classifier's output stride.
- CLIP-ES: the same dict with `attn_highres` (K x H x W, float16) in place of `high_res`.
- SEAM (infer_SEAM.py): `{class index (0-based): H x W map}`.
- ours (`mine.cam_format: npz`): `np.savez_compressed(keys=1-based uint8, cams=K x H x W
  float16)`.

np.load(allow_pickle=True) runs whatever the pickle asks for, so a `.npy` holding a pickle is
read here with an unpickler that builds only arrays, dtypes, numpy scalars, dicts and lists,
and torch tensors through torch's own weights-only loader (IRN's `keys` and `cam`); any other
global (a function to call, a class to build) is refused in one line, before it is imported.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from aepsl.data.datasets import Sample, image_size
from aepsl.errors import UserError
from aepsl.io import atomic_path, read_index_png, torch_load_failure
from aepsl.labelmap import IGNORE

CAM_SUFFIXES = (".npy", ".npz")


# ---------------------------------------------------------------- folder digest


def folder_digest(folder: str | Path, suffixes: Iterable[str]) -> str:
    """A hash of the files of `folder` with these suffixes: their names, sizes and modification
    times (os.stat, nanoseconds), not their contents: stat is all a re-run pays for a folder of
    10,000 files, and an edited or replaced file changes its mtime. A missing folder is a
    one-line error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    suffixes = tuple(suffixes)
    entries = []
    for path in folder.iterdir():
        if path.suffix in suffixes and path.is_file():
            stat = path.stat()
            entries.append(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}")
    entries.sort()
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- safe reading of .npy pickles


def _load_storage(data: bytes) -> Any:
    """torch.storage._load_from_bytes, through torch's weights-only loader. What it refuses is
    said in our words: torch's message advises loading with weights_only=False (running the
    file's code)."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        needs, reason = torch_load_failure(exc)
        if needs:
            raise _Refused(needs) from None
        raise ValueError(f"a tensor's storage is not readable: {reason}") from None


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict,
    }
    try:  # numpy 2 (numpy.core is a deprecated alias there); numpy 1's pickles name numpy.core
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # IRN's keys and cam are torch tensors: the tensor is rebuilt by torch's function (on
    # torch's weights-only allow-list) from a storage read by torch's weights-only loader.
    from torch._utils import _rebuild_tensor_v2

    allowed[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor_v2
    allowed[("torch.storage", "_load_from_bytes")] = _load_storage
    return allowed


class _ArrayUnpickler(pickle._Unpickler):
    """Builds arrays, dtypes, scalars, containers and (through torch's weights-only loader)
    tensors; refuses every other global before importing it, and every array or tensor beyond
    `max_elements` in all before it is built (a few bytes of pickle can declare any shape).

    The Python unpickler, whose opcodes can be inspected: the object pickles of CAM files are
    small (their data is raw bytes), so its speed does not matter."""

    allowed = None

    def __init__(self, stream: Any, max_elements: int) -> None:
        super().__init__(stream)
        self.budget = max_elements

    def find_class(self, module: str, name: str) -> Any:
        if _ArrayUnpickler.allowed is None:
            _ArrayUnpickler.allowed = _allowed()
        found = _ArrayUnpickler.allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")

    def _spend(self, shape: Any) -> None:
        """Charge an array or tensor of `shape` to the budget, before it is built."""
        try:
            dims = [int(d) for d in (shape if isinstance(shape, (tuple, list)) else [shape])]
        except (TypeError, ValueError):
            raise ValueError(f"an array shape that is not a list of sizes: {shape!r}") from None
        if any(d < 0 for d in dims):
            raise ValueError(f"a negative array size in {tuple(dims)}")
        self.budget -= math.prod(dims)
        if self.budget < 0:
            raise _TooLarge(tuple(dims))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if func is np.ndarray and args:  # ndarray(shape, ...) allocates
            self._spend(args[0])
        elif func is _ArrayUnpickler.allowed.get(("torch._utils", "_rebuild_tensor_v2")):
            self._spend(args[2])  # (storage, offset, size, stride, ...): a view of any size
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if isinstance(cls, type) and issubclass(cls, np.ndarray) and args:
            self._spend(args[0])
        self.append(cls.__new__(cls, *args))

    def load_build(self) -> None:
        state = self.stack[-1]
        target = self.stack[-2]
        if isinstance(target, np.ndarray) and isinstance(state, tuple) and len(state) >= 2:
            self._spend(state[1])  # (version, shape, dtype, fortran, data)
        super().load_build()

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build


class _TooLarge(pickle.UnpicklingError):
    """An array or tensor of the shape in args[0] would exceed the budget."""

    def error(self, path: Path, max_elements: int) -> UserError:
        return UserError(
            f"{path}: declares an array of shape {self.args[0]}, more values than CAMs of this "
            f"data set can hold ({max_elements} in all); refused before reading it"
        )


class _Refused(pickle.UnpicklingError):
    pass


def safe_load_npy(path: Path, max_elements: int) -> Any:
    """The array a `.npy` file holds; an object array (np.save of a dict) is unpickled with
    _ArrayUnpickler. A file that is not a .npy, is damaged, asks for code, or declares more than
    `max_elements` values in all is one line, before the memory is taken."""
    try:
        with path.open("rb") as stream:
            shape, dtype = _npy_header(stream)
            if not dtype.hasobject:
                if math.prod(shape) > max_elements:
                    raise _TooLarge(shape)
                stream.seek(0)
                return np.load(stream, allow_pickle=False)
            value = _ArrayUnpickler(stream, max_elements).load()
    except _TooLarge as exc:
        raise exc.error(path, max_elements) from None
    except _Refused as exc:
        raise UserError(
            f"{path}: refused: its pickle asks for {exc}, which could run code; only arrays, "
            "dicts and tensors are read from a .npy"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # bad magic, damaged header or pickle, truncation
        raise UserError(f"{path}: not a readable .npy file ({_one_line(exc)})") from None
    if isinstance(value, np.ndarray) and value.shape != tuple(shape):
        raise UserError(f"{path}: damaged .npy (shape {value.shape}, header says {shape})")
    return value


def _npy_header(stream: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header; the stream is left at the data."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return shape, dtype


def _one_line(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- CAM files


def _check_npz_sizes(path: Path, max_elements: int) -> None:
    """Every member's declared shape, from its header, within `max_elements` in all."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                shape, _ = _npy_header(member)
            total += math.prod(shape)
            if total > max_elements:
                raise _TooLarge(shape)


def _decode_cam_dict(path: Path, value: dict) -> tuple[list[int], np.ndarray]:
    """(keys 1..C, maps) of an IRN / CLIP-ES / SEAM dict; values of the wrong type (string
    or None keys, ragged or text maps, SEAM maps of two shapes) are one line."""
    if "keys" in value:
        field = next((k for k in ("high_res", "attn_highres") if k in value), None)
        if field is None:
            raise UserError(
                f"{path}: CAM dict has no 'high_res' (IRN) or 'attn_highres' (CLIP-ES) "
                f"entry; it holds {', '.join(map(str, value))}"
            )
    elif not all(isinstance(k, (int, np.integer)) for k in value):  # SEAM: {class: map}
        raise UserError(f"{path}: not a CAM dict (IRN: keys, cam, high_res)")
    try:
        if "keys" in value:
            keys = (_array(value["keys"]).astype(np.int64).ravel() + 1).tolist()
            return keys, _array(value[field]).astype(np.float32)
        maps = [_array(value[k]).astype(np.float32) for k in value]
        cams = np.stack(maps) if maps else np.zeros((0, 0, 0), np.float32)
        return [int(k) + 1 for k in value], cams
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: CAM dict with values of the wrong type ({_one_line(exc)})"
        ) from None


def cam_budget(num_classes: int, shape: tuple[int, int]) -> int:
    """The values a CAM file of an image of `shape` may declare in all: IRN's holds each class's
    map at image size and again at the network's stride, with its keys."""
    return 2 * num_classes * shape[0] * shape[1] + 4 * num_classes + 1024


def cam_file(folder: str | Path, image_id: str) -> Path | None:
    """`folder/<id>.npy` or `folder/<id>.npz`, whichever exists (.npy first)."""
    for suffix in CAM_SUFFIXES:
        path = Path(folder) / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (IRN's keys and cam)
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_cam_file(path: Path, num_classes: int, max_elements: int) -> tuple[list[int], np.ndarray]:
    """(class indices 1..C, float32 K x H x W image-size CAMs) of a CAM file of any format in
    the module docstring. Keys outside 1..C, a count of maps that differs from the keys, or
    more than `max_elements` values declared in all, is a one-line error."""
    if path.suffix == ".npz":
        if not zipfile.is_zipfile(path):  # else numpy advises allow_pickle=True for it
            raise UserError(f"{path}: not a CAM .npz with keys and cams (not a zip archive)")
        try:
            _check_npz_sizes(path, max_elements)
            with np.load(path, allow_pickle=False) as stored:
                keys = stored["keys"].astype(np.int64).ravel().tolist()
                cams = stored["cams"].astype(np.float32)
        except _TooLarge as exc:
            raise exc.error(path, max_elements) from None
        except Exception as exc:
            raise UserError(
                f"{path}: not a CAM .npz with keys and cams ({_one_line(exc)})"
            ) from None
    else:
        value = safe_load_npy(path, max_elements)
        if isinstance(value, np.ndarray) and value.dtype.hasobject and value.shape == ():
            value = value.item()
        if not isinstance(value, dict):
            raise UserError(f"{path}: not a CAM file: expected a dict saved with np.save")
        keys, cams = _decode_cam_dict(path, value)
    if cams.ndim == 2 and len(keys) == 1:
        cams = cams[None]
    if cams.ndim != 3 or len(cams) != len(keys):
        raise UserError(
            f"{path}: {len(keys)} class keys but CAMs of shape {tuple(cams.shape)} "
            "(expected keys x height x width)"
        )
    bad = [k for k in keys if not 1 <= k <= num_classes]
    if bad:
        raise UserError(
            f"{path}: class key {bad[0] - 1} outside 0..{num_classes - 1} (0-based, without "
            "background)"
            if path.suffix == ".npy"
            else f"{path}: class key {bad[0]} outside 1..{num_classes}"
        )
    return keys, cams


def image_cams(
    folder: str | Path, sample: Sample, num_classes: int, shape: tuple[int, int]
) -> np.ndarray:
    """The CAMs of `sample`'s classes (in the order of sample.labels; a class the file lacks
    gets a zero map) from `folder`, ReLU'd and max-normalised to [0, 1] as our CAMs are, at the
    image's size `shape` (H, W): a file at another size is a one-line error."""
    path = cam_file(folder, sample.id)
    if path is None:
        raise UserError(f"{Path(folder) / sample.id}.npy: CAM file missing (nor .npz)")
    keys, cams = read_cam_file(path, num_classes, cam_budget(num_classes, shape))
    if len(cams) and tuple(cams.shape[-2:]) != tuple(shape):
        raise UserError(
            f"{path}: CAMs are {cams.shape[-1]}x{cams.shape[-2]} but the image is "
            f"{shape[1]}x{shape[0]}"
        )
    out = np.zeros((len(sample.labels), *shape), np.float32)
    for row, label in enumerate(sample.labels):
        if label in keys:
            cam = np.asarray(cams[keys.index(label)], np.float32)
            broken = int(np.count_nonzero(~np.isfinite(cam)))
            if broken:  # NaN would mine nothing and inf the whole image, silently
                raise UserError(
                    f"{path}: the CAM of class {label - (path.suffix == '.npy')} has {broken} "
                    "NaN or infinite values (did the network that made it diverge?)"
                )
            cam = np.maximum(cam, 0)
            peak = cam.max()
            out[row] = cam / max(peak, 1e-5)
    return out


def most_image_cams(
    folders: Sequence[str | Path], sample: Sample, num_classes: int, shape: tuple[int, int]
) -> np.ndarray:
    """Per class the most of `sample`'s CAMs (image_cams) over `folders` (at least one): each
    class's evidence in any of them, e.g. any erasing step."""
    most = image_cams(folders[0], sample, num_classes, shape)
    for folder in folders[1:]:
        np.maximum(most, image_cams(folder, sample, num_classes, shape), out=most)
    return most


def write_irn_cam(path: Path, keys: list[int], strided: np.ndarray, high_res: np.ndarray) -> None:
    """IRN's per-image file: {"keys": 0-based classes (int64), "cam": K x h x w at the network's
    stride, "high_res": K x H x W at image size}, float32, each map max-normalised."""
    record = {
        "keys": np.asarray(keys, np.int64) - 1,
        "cam": np.asarray(strided, np.float32),
        "high_res": np.asarray(high_res, np.float32),
    }
    buffer = io.BytesIO()
    np.save(buffer, record, allow_pickle=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


# ---------------------------------------------------------------- pseudo-label folders


def check_pseudo_labels(
    folder: str | Path, samples: list[Sample], num_classes: int, examples: int = 3
) -> None:
    """Every training image has `folder/<id>.png`, of its image's size, with values 0..C and
    255. Faults are gathered over the whole folder and raised as one UserError of one line,
    a part per kind of fault (separated by "; "), each naming how many and up to `examples`
    ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: pseudo-label folder not found")
    missing: list[str] = []
    sized: list[str] = []
    valued: list[str] = []
    unreadable: list[str] = []
    for sample in samples:
        path = folder / f"{sample.id}.png"
        if not path.is_file():
            missing.append(f"'{sample.id}'")
            continue
        try:
            labels = read_index_png(path)
        except UserError as exc:
            reason = str(exc).removeprefix(f"{path}: ")  # the id names the file
            unreadable.append(f"'{sample.id}' ({_one_line(reason, 80)})")
            continue
        height, width = image_size(sample.image)
        if labels.shape != (height, width):
            sized.append(
                f"'{sample.id}' ({labels.shape[1]}x{labels.shape[0]}, image {width}x{height})"
            )
            continue
        bad = (labels > num_classes) & (labels != IGNORE)
        if bad.any():
            valued.append(f"'{sample.id}' ({int(labels[bad].max())})")
    parts = []
    for found, what in (
        (missing, "missing"),
        (unreadable, "unreadable"),
        (sized, "of another size than their image"),
        (valued, f"with values outside 0..{num_classes} and 255"),
    ):
        if found:
            noun = "pseudo label" if len(found) == 1 else "pseudo labels"
            listed = ", ".join(found[:examples])
            parts.append(f"{len(found)} {noun} {what}, e.g. {listed}")
    if parts:
        raise UserError(f"{folder}: {'; '.join(parts)}")
