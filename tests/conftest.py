"""Shared fixtures: tiny datasets written by hand, so tests need no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepsl.io import write_index_png


def make_folder_dataset(root: Path, n: int = 6, size: int = 32, seed: int = 0) -> Path:
    """A folder dataset of n images: class 1 'square' and/or class 2 'disc', with masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("square\ndisc\n")
    rows = ["image,labels"]
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        names = []
        if i % 3 != 1:
            mask[4:14, 4:14] = 1
            image[4:14, 4:14] = (220, 40, 40)
            names.append("square")
        if i % 3 != 0:
            disc = (yy - 22) ** 2 + (xx - 22) ** 2 < 36
            mask[disc] = 2
            image[disc] = (40, 40, 220)
            names.append("disc")
        mask[0, :] = 255
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        write_index_png(root / "masks" / f"img{i}.png", mask)
        rows.append(f"img{i},{' '.join(names)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "splits").mkdir()
    ids = [f"img{i}" for i in range(n)]
    (root / "splits" / "train.txt").write_text("\n".join(ids[: n - 2]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[n - 2 :]) + "\n")
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "data")


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder inside tmp_path, so stray relative writes would be seen."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def data(tmp_path, cwd) -> Path:
    """make_folder_dataset in tmp_path/data, run from `cwd` (the bad-input tests' dataset)."""
    return make_folder_dataset(tmp_path / "data")
