"""The paper's VOC recipe end to end on a tiny VOC-shaped dataset, on the CPU: a VOCdevkit
(JPEGImages, palette SegmentationClass, Annotations XML, ImageSets with train/val/trainval/
test) and an SBD release of .mat files, `aepsl prepare-voc`, `aepsl run configs/voc_vgg16.yaml`
through every stage (VGG16 with weights=none, tiny sizes and lengths), and `aepsl predict
--split test --format voc-test` into the server's tarball."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_prepare_voc import write_sbd_mat

from aepsl.cli import main
from aepsl.io import read_index_png, write_index_png

PRESET = str(Path(__file__).resolve().parents[1] / "src" / "aepsl" / "configs" / "voc_vgg16.yaml")
PERSON, CAR = 15, 7  # VOC class indices
VOC_TRAIN = ["2007_000032", "2007_000039", "2007_000063"]
VOC_VAL = ["2007_000033", "2007_000042", "2007_000061"]
VOC_TEST = ["2008_000001", "2008_000002"]
SBD_TRAIN = ["2008_000100", "2008_000101", "2007_000033"]  # the last is VOC val: left out
SBD_VAL = ["2008_000102"]
TRAIN_AUG = sorted({*VOC_TRAIN, "2008_000100", "2008_000101", "2008_000102"})
SIZE = 64

OVERRIDES = [
    "device=cpu",
    "precision=fp32",
    "model.weights=none",
    "data.num_workers=0",
    "data.image_size=48",
    "train.crop_size=48",
    "mine.steps=2",
    "mine.epochs=1",
    "mine.batch_size=2",
    "mine.visualise=1",
    "train.iterations=2",
    "train.batch_size=2",
    "labels.visualise=1",
    "crf.workers=1",
    "crf.backend=torch",
]


def _scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x (56 or 64) image with a red 'person' box and/or a blue 'car' box, and its mask
    with VOC's 255 outline."""
    width = SIZE if index % 2 else SIZE - 8
    rng = np.random.default_rng(index)
    image = rng.integers(60, 120, (SIZE, width, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, width), np.uint8)
    if index % 3 != 1:
        image[8:40, 6:30] = (200, 40, 40)
        mask[8:40, 6:30] = PERSON
    if index % 3 != 0:
        image[36:58, 30:52] = (40, 40, 200)
        mask[36:58, 30:52] = CAR
    mask[7, 6:30] = 255
    return image, mask


def make_voc(root: Path) -> tuple[Path, Path]:
    voc = root / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    for folder in ("JPEGImages", "SegmentationClass", "Annotations", "saliency"):
        (voc / folder).mkdir(parents=True)
    sets.mkdir(parents=True)
    sbd = root / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    everything = [*VOC_TRAIN, *VOC_VAL, *VOC_TEST, *SBD_TRAIN, *SBD_VAL]
    for index, image_id in enumerate(dict.fromkeys(everything)):
        image, mask = _scene(index)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        names = [n for k, n in ((PERSON, "person"), (CAR, "car")) if (mask == k).any()]
        objects = "".join(f"<object><name>{n}</name></object>" for n in names)
        (voc / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        salient = np.where(mask > 0, 230, 10).astype(np.uint8)  # stands in for DRFI's maps
        Image.fromarray(salient).save(voc / "saliency" / f"{image_id}.png")
        if image_id in VOC_TRAIN + VOC_VAL:
            write_index_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
        if image_id in SBD_TRAIN + SBD_VAL:
            write_sbd_mat(sbd / "cls" / f"{image_id}.mat", np.where(mask == 255, 0, mask))
    for name, ids in [
        ("train", VOC_TRAIN),
        ("val", VOC_VAL),
        ("trainval", VOC_TRAIN + VOC_VAL),
        ("test", VOC_TEST),
    ]:
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return voc, sbd.parent


@pytest.mark.filterwarnings("ignore")
def test_voc_recipe_end_to_end(tmp_path, capsys):
    voc, sbd = make_voc(tmp_path / "data")
    assert main(["prepare-voc", "--voc", str(voc), "--sbd", str(sbd)]) == 0
    sets = voc / "ImageSets" / "Segmentation"
    assert sets.joinpath("train_aug.txt").read_text().split() == TRAIN_AUG
    assert main(["data-info", PRESET, f"data.root={voc}"]) == 0

    run = tmp_path / "runs" / "voc"
    code = main(["run", PRESET, f"data.root={voc}", *OVERRIDES, "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["cam_head"] == "largefov"
    assert resolved["train"]["schedule"] == "step" and resolved["saliency"]["source"] == "dir"
    for step in (1, 2):
        assert (run / "mine" / f"step{step}" / "classifier.pt").is_file()
    assert sorted(p.stem for p in (run / "labels").glob("*.png")) == TRAIN_AUG
    # stage metrics on VOC train (as IRN's scripts and published numbers), not train_aug
    printed = capsys.readouterr().out
    assert f"seed mIoU on split 'train' ({len(VOC_TRAIN)} images)" in printed
    assert f"pseudo labels on split 'train' ({len(VOC_TRAIN)} images)" in printed
    for stage in ("mine", "labels"):
        scored = json.loads((run / stage / "metrics.json").read_text())["scored"]
        assert scored == {"split": "train", "images": len(VOC_TRAIN)}
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["split"] == "val"
    assert 0 <= metrics["without_crf"]["mIoU"] <= 1 and 0 <= metrics["with_crf"]["mIoU"] <= 1
    assert sorted(p.stem for p in (run / "predict").glob("*.png")) == VOC_VAL
    assert (run / "report.html").is_file()

    test = tmp_path / "runs" / "voc_test"
    args = ["predict", PRESET, f"data.root={voc}", *OVERRIDES, "--split", "test", "--crf"]
    args += ["--checkpoint", str(run / "train" / "model.pt"), "--format", "voc-test"]
    assert main([*args, "--out", str(test)]) == 0, capsys.readouterr().err
    folder = test / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i}.png" for i in VOC_TEST]
    for image_id in VOC_TEST:
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as image:
            width = image.size[0]
        assert read_index_png(folder / f"{image_id}.png").shape == (SIZE, width)
    with tarfile.open(test / "results.tgz") as tar:
        assert tar.getnames() == [
            f"results/VOC2012/Segmentation/comp6_test_cls/{i}.png" for i in VOC_TEST
        ]
