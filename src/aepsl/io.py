"""File formats shared by the stages: index PNGs, JSON, images, checkpoints.

Every write goes to a temporary file in the destination folder and is renamed into place,
so an interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Save tensors and plain containers only, so the file loads with `weights_only=True`."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint without running any code it may contain."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal, truncation, foreign formats
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours its message
        needs_code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if isinstance(exc, pickle.UnpicklingError) and needs_code:
            raise UserError(
                f"{path}: refused: loading it would run Python code ({needs_code.group(1)}); "
                "aepsl checkpoints hold tensors only"
            ) from None
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        lines = [line.strip() for line in detail.strip().splitlines() if line.strip()]
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint "
            f"({lines[0] if lines else type(exc).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: checkpoint is not a dictionary of tensors")
    return state


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


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path}: cannot decode image ({exc})") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        image.close()
        raise UserError(f"{path}: cannot decode image ({exc})") from None
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image as HxWx3 uint8 RGB: EXIF rotation applied; grey, RGBA, palette, 16-bit ok."""
    path = Path(path)
    image = ImageOps.exif_transpose(_open(path))
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
