"""File formats shared by the stages: index PNGs, JSON, images, checkpoints.

Every write goes to a temporary file in the destination folder and is renamed into place,
so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from aepsl.errors import UserError
from aepsl.labelmap import PALETTE


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from the group
        _fsync(tmp)  # the bytes reach the disk before the name does: no empty file after a crash
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)  # and the rename itself


def _umask() -> int:
    """The process's umask, so files are created as `cp` or `open` would create them. Read from
    /proc where it is there (setting it to read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file (errors propagate: the write did not happen) or, where the OS can, a folder
    (Windows cannot open one; some file systems refuse to sync one: both are skipped)."""
    if directory:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (short form), to tie outputs to the checkpoint behind them."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save tensors and plain containers only, so the file loads with `weights_only=True`.

    Serialised in memory first: torch names the records inside the zip after the file it
    writes, so writing the temporary file directly gave different bytes for the same tensors;
    and a full disk then fails as an OSError (ENOSPC) of the plain write, not deep in torch."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def read_json(path: str | os.PathLike, fix: str, kind: type = dict) -> Any:
    """A JSON file a stage wrote, or a one-line error naming it, what is wrong, and `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); {fix}") from None
    try:
        data = json.loads(text)
    except ValueError:
        problem = "empty" if not text.strip() else "damaged (not valid JSON)"
        raise UserError(f"{path}: {problem}; {fix}") from None
    if not isinstance(data, kind):
        raise UserError(
            f"{path}: damaged (a JSON {type(data).__name__}, not a {kind.__name__}); {fix}"
        )
    return data


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without running any code it may contain."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal, truncation, foreign formats
        needs, reason = torch_load_failure(exc)
        if needs or (needs := _disallowed_global(path)):
            raise UserError(
                f"{path}: refused: loading it would run Python code ({needs}); "
                "aepsl checkpoints hold tensors only"
            ) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_clip(reason)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: checkpoint is not a dictionary of tensors")
    return state


_TORCH_ADVICE = (
    "weights_only",
    "Weights only load failed",
    "safe_globals",
    "Check the documentation",
)
# What torch's weights-only unpickler says when a pickle needs a callable or class it does not
# allow: the pickle would run that code if loaded any other way.
_NEEDS_CODE = (
    r"GLOBAL ([\w.]+) (?:whose module|was not an allowed)",  # os.system, builtins.eval, ...
    r"Trying to call reduce for unrecognized function (.+?)(?: which belongs|$)",
    r"Can only create new object for .*? but got (.+)$",
    r"Can only build .*?, but got (.+)$",
)


def torch_load_failure(exc: BaseException) -> tuple[str | None, str]:
    """What a failed weights-only torch.load says, in our words: (the callable or class the
    pickle asks for, None when it is not a refusal of code; the first line of the reason, never
    torch's advice to load with weights_only=False, which runs the file's code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours its message
    needs = _code_in_pickle(text) if isinstance(exc, pickle.UnpicklingError) else None
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [
        line.strip()
        for line in detail.strip().splitlines()
        if line.strip() and not any(advice in line for advice in _TORCH_ADVICE)
    ]
    return needs, lines[0] if lines else type(exc).__name__


def _code_in_pickle(text: str) -> str | None:
    """The callable or class a refused pickle asks for, named as the user would import it."""
    for pattern in _NEEDS_CODE:
        found = re.search(pattern, text, re.MULTILINE)
        if found:
            name = found.group(1).strip()
            # torch drops the "builtins." of a builtin (GLOBAL eval): put it back
            return _clip(
                _py3_name(name if "." in name or not name.isidentifier() else f"builtins.{name}")
            )
    return None


def _reason(exc: BaseException) -> str:
    return _clip(str(exc)) or type(exc).__name__


def _py3_name(name: str) -> str:
    """A pickle's Python 2 global (protocols 0-2: __builtin__.set, commands.call) as Python 3
    names it (builtins.set, subprocess.call)."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[(module, attr)])
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}" if module else name


def _disallowed_global(path: Path) -> str | None:
    """The first global (module.name) the file's pickle imports that torch's weights-only
    loader does not allow, read with pickletools, which runs nothing. For what torch stops at
    before naming the global (protocol 4-5 STACK_GLOBAL: "Unsupported operand 149")."""
    import pickletools
    import zipfile

    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # a private helper of torch's: if it moves, allow torch's own names only
        allowed = set()

    def allowed_name(name: str) -> bool:
        return name in allowed or name.startswith(("torch.", "collections.OrderedDict"))

    strings = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING"}
    strings |= {"BINSTRING", "STRING"}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                stream = io.BytesIO(archive.read(pickles[0]) if pickles else b"")
        else:
            stream = io.BytesIO(path.read_bytes())
        while stream.tell() < len(stream.getbuffer()):  # the legacy format chains pickles
            recent: list[str | None] = []
            memo: dict[int, str | None] = {}
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    found = str(arg).replace(" ", ".", 1)
                elif name == "STACK_GLOBAL" and len(recent) >= 2 and None not in recent[-2:]:
                    found = f"{recent[-2]}.{recent[-1]}"
                else:
                    found = None
                    if name in strings:
                        recent.append(str(arg))
                    elif name == "MEMOIZE":
                        memo[len(memo)] = recent[-1] if recent else None
                    elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                        memo[int(arg)] = recent[-1] if recent else None
                    elif name in ("BINGET", "LONG_BINGET", "GET"):
                        recent.append(memo.get(int(arg)))
                    elif name not in ("FRAME", "PROTO"):
                        recent.append(None)
                if found and not allowed_name(found := _py3_name(found)):
                    return _clip(found)
    except Exception:  # not a pickle past this point: nothing more to name
        return None
    return None


def _clip(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters, for quoting a value or a library's message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_index_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label map (uint8, 255 = ignore) as a palette PNG with the VOC colours."""
    image = Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(PALETTE)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


_max_pixels = 40_000_000  # data.max_pixels's default; a command sets its own (pixel_limit)
_PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def max_pixels() -> int:
    """The largest image (width x height) the readers here decode now."""
    return _max_pixels


def set_pixel_limit(limit: int) -> None:
    """From now on, the readers here decode images of at most `limit` pixels (a worker process
    takes its command's for its whole life; a command uses `pixel_limit`)."""
    global _max_pixels
    _max_pixels = int(limit)
    # Pillow's own decompression-bomb limit must not be the tighter one.
    Image.MAX_IMAGE_PIXELS = max(_max_pixels, _PILLOW_MAX_PIXELS)


@contextmanager
def pixel_limit(limit: int) -> Iterator[None]:
    """Within the block, the readers here decode images of at most `limit` pixels (a command's
    `data.max_pixels`); the limit before is restored after it."""
    global _max_pixels
    before, pillow_before = _max_pixels, Image.MAX_IMAGE_PIXELS
    set_pixel_limit(limit)
    try:
        yield
    finally:
        _max_pixels, Image.MAX_IMAGE_PIXELS = before, pillow_before


def read_header(path: str | os.PathLike) -> Image.Image:
    """Open an image, reading its header only: size, mode, EXIF. Refuses an empty file, a file
    Pillow cannot identify and one over `max_pixels()`; the caller closes the image."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit, so over ours
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
        raise UserError(f"{path}: image has {size}, over data.max_pixels={_max_pixels}") from None
    except Exception as exc:  # UnidentifiedImageError, or a hostile file's odd header
        raise UserError(f"{path}: cannot decode image ({_reason(exc)})") from None
    width, height = image.size
    if width * height > _max_pixels:
        image.close()
        raise UserError(
            f"{path}: image is {width}x{height} ({width * height} pixels), "
            f"over data.max_pixels={_max_pixels}"
        )
    # Over Pillow's bomb limit is over ours too (refused above); its other warnings (corrupt
    # EXIF) do not name the file: once, with the file's name.
    _warn_once(path, [w for w in caught if w.category is not Image.DecompressionBombWarning])
    return image


def _warn_once(path: Path, caught: list[warnings.WarningMessage]) -> None:
    if caught:
        message = _clip(str(caught[0].message))
        prefix = f"{path}: "
        warnings.warn(message if message.startswith(prefix) else prefix + message, stacklevel=3)


def _open(path: Path) -> Image.Image:
    image = read_header(path)
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data, whatever the decoder raises
        image.close()
        raise UserError(f"{path}: cannot decode image ({_reason(exc)})") from None
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image as HxWx3 uint8 RGB: EXIF rotation applied; grey, RGBA, palette, 16-bit ok."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:  # Pillow's words lack the file name
        warnings.simplefilter("always")
        image = ImageOps.exif_transpose(_open(path))
    _warn_once(path, caught)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.clip(np.asarray(image) * (255.0 if np.asarray(image).max() <= 1 else 1), 0, 255)
        return np.repeat(array.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite on white rather than dropping alpha, which can reveal arbitrary colours.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def read_index_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label map: palette or greyscale PNG whose pixel values are the class indices."""
    path = Path(path)
    image = _open(path)
    if image.mode not in ("P", "L", "I", "I;16"):
        raise UserError(
            f"{path}: label map must be a palette or greyscale PNG, got mode {image.mode}"
        )
    array = np.asarray(image)
    if array.max(initial=0) > 255:
        raise UserError(f"{path}: label value {int(array.max())} is out of range (0..255)")
    return array.astype(np.uint8)


def read_gray_png(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel map (e.g. saliency, 0..255) as float32 in [0, 1]."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
