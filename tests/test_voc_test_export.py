"""`aepsl predict --format voc-test` is upload-ready: the server's folder holds the index PNGs
only, and OUT/results.tgz holds exactly them under results/VOC2012/Segmentation/comp6_test_cls/,
written atomically."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aepsl.cli import main
from aepsl.errors import UserError
from aepsl.inference.predict import VOC_TEST_LAYOUT, write_voc_archive
from aepsl.io import read_index_png
from aepsl.models.saved import model_record
from aepsl.models.segnet import build_segnet

IDS = ["2008_000001", "2008_000002", "2008_000003"]


@pytest.fixture
def model_and_images(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    net = build_segnet("tiny", "none", 20)
    model = tmp_path / "model.pt"
    torch.save(model_record(net, "segnet", "tiny", 20), model)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, image_id in enumerate(IDS):
        pixels = rng.integers(0, 256, (24 + 8 * k, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{image_id}.jpg")
    return model, images


@pytest.mark.parametrize("crf", [False, True])
def test_voc_test_folder_and_archive(model_and_images, tmp_path, crf):
    model, images = model_and_images
    out = tmp_path / "voc_test"
    args = ["predict", "device=cpu", "precision=fp32", "crf.workers=1", "crf.backend=torch"]
    args += ["--checkpoint", str(model), "--images", str(images), "--out", str(out)]
    assert main([*args, "--format", "voc-test", *(["--crf"] if crf else [])]) == 0
    folder = out / VOC_TEST_LAYOUT
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in IDS]  # no overlay/
    # manifest: who made them; health: the collapse warnings
    names = ["config.yaml", "health.json", "manifest.json", "results", "results.tgz"]
    assert sorted(p.name for p in out.iterdir()) == names
    with tarfile.open(out / "results.tgz") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            f"results/VOC2012/Segmentation/comp6_test_cls/{i}.png" for i in IDS
        ]
        assert all(m.isfile() and m.uname == "" and m.uid == 0 for m in members)
        for member, image_id in zip(members, IDS, strict=True):
            assert tar.extractfile(member).read() == (folder / f"{image_id}.png").read_bytes()
    for k, image_id in enumerate(IDS):
        labels = read_index_png(folder / f"{image_id}.png")
        assert labels.shape == (24 + 8 * k, 32) and labels.max() <= 20


def test_png_format_keeps_its_overlays(model_and_images, tmp_path):
    model, images = model_and_images
    out = tmp_path / "png"
    args = ["predict", "device=cpu", "precision=fp32", "--checkpoint", str(model)]
    assert main([*args, "--images", str(images), "--out", str(out)]) == 0
    assert sorted(p.stem for p in (out / "overlay").glob("*.png")) == IDS
    assert not (out / "results.tgz").exists()


def test_archive_refuses_missing_predictions(tmp_path):
    (tmp_path / VOC_TEST_LAYOUT).mkdir(parents=True)
    with pytest.raises(UserError, match=r"1 of 1 predictions missing \(e\.g\. x\.png\)"):
        write_voc_archive(tmp_path, ["x"])
    assert list(tmp_path.iterdir()) == [tmp_path / "results"]  # no archive, no temporary file
