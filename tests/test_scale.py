"""Defaults that carry over to data the presets were not tuned on: CAMs at the scale the
classifier learnt, small images enlarged for the segmentation network, length in epochs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO_FULL
from torch import nn

from aepsl.config import load_config
from aepsl.inference.predict import predict_probs
from aepsl.mine.extract import compute_cams
from aepsl.mine.train import step_epochs
from aepsl.models.segnet import input_scale
from aepsl.psl.data import draw_crop
from aepsl.psl.stage import with_length


class SeenSizes(nn.Module):
    """Records the input sizes it is given; one channel of class maps / scores."""

    def __init__(self, classes: int = 1) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.output_stride = 8
        self.input_size = 0
        self.input_min_side = 0
        self.classes = classes

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(images.shape[-2:]))
        return torch.ones(len(images), self.classes, *(s // 8 for s in images.shape[-2:]))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(tuple(images.shape[-2:]))
        size = [max(1, s // 8) for s in images.shape[-2:]]
        return torch.zeros(len(images), self.classes + 1, *size), torch.zeros(len(images), 1)


@pytest.mark.parametrize(
    ("side", "cam_size", "seen"),
    [(64, "train", 128), (256, "train", 128), (128, "train", 128), (64, "native", 64)],
)
def test_cams_are_taken_at_the_training_scale(side, cam_size, seen):
    config = load_config(
        None, ["data.image_size=128", f"mine.cam_size={cam_size}", "precision=fp32"]
    )
    model = SeenSizes()
    cams = compute_cams(model, torch.rand(1, 3, side, side), config, torch.device("cpu"))
    assert model.seen == [(seen, seen)]
    assert cams.shape == (1, 1, side, side)  # back at the image's own size


def test_cams_keep_the_aspect_and_apply_cam_scales():
    config = load_config(None, ["data.image_size=100", "mine.cam_scales=[1.0,0.5]"])
    model = SeenSizes()
    compute_cams(model, torch.rand(1, 3, 50, 200), config, torch.device("cpu"))
    assert model.seen == [(50, 200), (25, 100)]  # sqrt(50 x 200) = 100 already, then x 0.5


@pytest.mark.parametrize(("height", "width", "seen"), [(64, 96, (112, 168)), (200, 300, None)])
def test_small_images_are_enlarged_to_the_crop_for_prediction(height, width, seen):
    config = load_config(None, ["precision=fp32"])
    model = SeenSizes()
    model.input_min_side = 112
    image = np.zeros((height, width, 3), np.uint8)
    probs = predict_probs(model, image, config, torch.device("cpu"))
    assert model.seen == [seen or (height, width)]
    assert probs.shape == (2, height, width)


def test_small_images_are_enlarged_to_the_crop_for_training():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = draw_crop(generator, 48, 64, 112, (0.7, 1.3), base=112 / 48)
        assert 0.7 * 112 - 1 <= crop.height <= 1.3 * 112 + 1  # the shorter side at crop scale
        assert abs(crop.width / crop.height - 64 / 48) < 0.05  # the aspect kept


@pytest.mark.parametrize(
    ("height", "width", "size", "min_side", "scale"),
    [
        (320, 320, 128, 0, 0.4),  # a large image reduced to the working size
        (200, 800, 200, 0, 0.5),  # sqrt(200 x 800) = 400: the aspect kept
        (50, 200, 128, 0, 1.0),  # sqrt = 100: smaller than the working size, never enlarged
        (64, 64, 128, 112, 1.75),  # ... except to the crop size (upscale_small)
        (40, 400, 128, 112, 2.8),  # thin: the shorter side asks for 2.8
        (400, 400, 128, 112, 0.32),  # reduced, and then above the crop already
        (300, 300, 0, 112, 1.0),  # no working size: its own size
        (64, 96, 0, 112, 1.75),  # only the shorter side's minimum
        (64, 96, 0, 0, 1.0),
    ],
)
def test_input_scale(height, width, size, min_side, scale):
    assert input_scale(height, width, size, min_side) == pytest.approx(scale)


def test_large_images_are_predicted_at_the_working_size():
    config = load_config(None, ["precision=fp32"])
    model = SeenSizes()
    model.input_size, model.input_min_side = 128, 112
    probs = predict_probs(model, np.zeros((256, 256, 3), np.uint8), config, torch.device("cpu"))
    assert model.seen == [(128, 128)]
    assert probs.shape == (2, 256, 256)  # back at the image's own size


def test_large_images_are_trained_at_the_working_size(tmp_path):
    from PIL import Image

    from aepsl.data.datasets import Sample
    from aepsl.psl.data import PseudoLabelled

    label = np.zeros((320, 320), np.uint8)
    label[:, :160] = 1  # the left half is class 1
    (tmp_path / "labels").mkdir()
    Image.fromarray(label).save(tmp_path / "labels" / "a.png")
    Image.fromarray(np.zeros((320, 320, 3), np.uint8)).save(tmp_path / "a.png")
    sample = Sample("a", tmp_path / "a.png", (1,))
    data = PseudoLabelled([sample], 1, tmp_path / "labels", 112, (1.0, 1.0), 0, 128, 112)
    for epoch in range(5):
        data.set_epoch(epoch)
        crop = data[0][1]
        # a 112 px crop of the image at 128 px shows 77% of it, so always both halves (a crop
        # of the 320 px image, 12% of it, may show one); each column is one class
        share = (crop[0] == 1).float().mean().item()
        assert crop.shape == (112, 112) and 0.4 <= share <= 0.6


def test_the_working_size_is_saved_with_the_model(tmp_path):
    from aepsl.models.saved import model_record
    from aepsl.models.segnet import build_segnet, load_segnet

    net = build_segnet("tiny", "none", 2)
    net.input_size, net.input_min_side = 128, 112
    torch.save(model_record(net, "segnet", "tiny", 2), tmp_path / "model.pt")
    loaded = load_segnet(tmp_path / "model.pt")
    assert (loaded.input_size, loaded.input_min_side) == (128, 112)


def test_length_in_epochs_scales_with_the_data():
    config = load_config(None, ["train.epochs=10", "train.batch_size=8"])
    assert with_length(config, 180).train.iterations == 225
    assert with_length(config, 1200).train.iterations == 1500
    assert with_length(config, 3).train.iterations == 4  # round(3.75)
    assert with_length(load_config(None), 180).train.iterations == 6000  # no epochs: as given
    demo = load_config(DEMO_FULL)
    assert with_length(demo, 180).train.iterations == 250  # the demo's 5-minute length
    by_hand = load_config(DEMO_FULL, ["train.iterations=50"])
    assert by_hand.train.epochs is None and with_length(by_hand, 180).train.iterations == 50


def test_a_small_data_set_trains_at_least_min_iterations():
    config = load_config(
        None, ["train.epochs=10", "train.batch_size=8", "train.min_iterations=400"]
    )
    assert with_length(config, 90).train.iterations == 400  # 10 x 90 / 8 = 112 is raised
    assert with_length(config, 1200).train.iterations == 1500  # the epochs give more: kept


def test_a_small_data_set_shows_each_class_min_positives_times():
    from aepsl.data.datasets import Sample

    def split(images: int, classes: int, per_image: int = 2) -> list:
        """`images` samples, each with `per_image` of `classes` classes, in turn."""
        return [
            Sample(str(i), Path(f"{i}.png"), tuple(1 + (i + k) % classes for k in range(per_image)))
            for i in range(images)
        ]

    cfg = load_config(None, ["mine.epochs=5", "mine.min_positives=400"]).mine
    # 90 images in batches of 16: an epoch shows 80 of them, 160 labels, 32 a class
    assert step_epochs(cfg, split(90, 5)) == 13  # ceil(400 / 32)
    assert step_epochs(cfg, split(90, 20)) == 50  # 8 a class: more classes, more epochs
    assert step_epochs(cfg, split(2000, 5, 1)) == 5  # about 400 an epoch already
    # classes.txt may list more than the split holds: only the split's classes count
    assert step_epochs(cfg, split(90, 2)) == 5  # ceil(400 x 2 / 160) = 5
    assert step_epochs(cfg, split(10, 5)) == 100  # fewer than a batch: all shown, 4 a class
    # 84 images, 90 labels of 3 classes: exactly 400 x 3 x 84 / (90 x 80) = 14 epochs
    uneven = [
        Sample(str(i), Path(f"{i}.png"), (1 + i % 3, 1 + (i + 1) % 3) if i < 6 else (1 + i % 3,))
        for i in range(84)
    ]
    assert step_epochs(cfg, uneven) == 14
    unset = load_config(None, ["mine.epochs=5"]).mine
    assert step_epochs(unset, split(90, 20)) == 5  # 0: as given


def test_a_warmup_longer_than_the_epochs_is_one_line():
    from aepsl.errors import UserError

    config = load_config(None, ["train.epochs=1", "train.batch_size=8", "train.psl_warmup=50"])
    with pytest.raises(UserError, match=r"train\.psl_warmup=50 is not below the 23 iterations"):
        with_length(config, 180)
    floor = load_config(
        None,
        ["train.epochs=1", "train.batch_size=8", "train.psl_warmup=50", "train.min_iterations=40"],
    )
    with pytest.raises(UserError, match=r"40 iterations train\.min_iterations=40 sets: PSL"):
        with_length(floor, 180)
