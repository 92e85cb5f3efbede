"""The shared types of the dataset readers: a sample (one image, its files and labels) and a
dataset (classes and named splits), with the rule every image id obeys."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from aepsl.errors import UserError

MAX_ID_BYTES = 240  # ids name output files (<id>.png, <id>.npz); most file systems allow 255


@dataclass(frozen=True)
class Sample:
    """One image: its id, files, and image-level labels as class indices 1..C."""

    id: str
    image: Path
    labels: tuple[int, ...]
    mask: Path | None = None
    saliency: Path | None = None


@dataclass
class Dataset:
    root: Path
    classes: list[str]  # class k (1..C) is classes[k - 1]; 0 is background
    splits: dict[str, list[Sample]]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"{self.root}: no split named '{name}' (splits: {known})")
        return self.splits[name]

    def training_split(self, name: str) -> list[Sample]:
        """split(name), refusing one without images: nothing can be trained on it."""
        samples = self.split(name)
        if not samples:
            skipped = f"; skipped: {self.skipped}" if self.skipped else ""
            raise UserError(
                f"{self.root}: the training split '{name}' (data.train_split) has no images; "
                f"check its split file and labels{skipped}"
            )
        return samples

    def has_split(self, name: str) -> bool:
        return name in self.splits


def check_id(image_id: str, source: str) -> str:
    """Ids become file names in every output folder: refuse anything but a plain name."""
    if (
        not image_id
        or image_id in (".", "..")
        or "/" in image_id
        or "\\" in image_id
        or "\x00" in image_id
        or image_id != image_id.strip()
    ):
        raise UserError(f"{source}: image id {short(image_id)!r} is not a plain file name")
    if len(image_id.encode("utf-8")) > MAX_ID_BYTES:
        raise UserError(
            f"{source}: image id '{short(image_id)}' is too long "
            f"({len(image_id.encode('utf-8'))} bytes; output file names allow {MAX_ID_BYTES})"
        )
    return image_id


def short(text: str, limit: int = 60) -> str:
    """A name or value read from a file, cut short so that an error stays one short line."""
    return text if len(text) <= limit else text[:limit] + "..."


def warn_skipped(root: Path, skipped: dict[str, int]) -> None:
    for reason, count in skipped.items():
        warnings.warn(f"{root}: skipped {count} image(s) with {reason}", stacklevel=3)
