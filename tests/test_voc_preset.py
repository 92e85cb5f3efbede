"""configs/voc_vgg16.yaml holds the paper's settings: the largefov CAM classifier and
DeepLab-LargeFOV's schedule, 2,000 iterations each at 1e-3, 1e-4 and 1e-5, none at 1e-6."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.psl.stage import learning_rate_factor

PRESET = Path(__file__).resolve().parents[1] / "src" / "aepsl" / "configs" / "voc_vgg16.yaml"


def test_voc_preset_is_the_papers_setting():
    config = load_config(PRESET)
    assert (config.model.backbone, config.model.weights) == ("vgg16", "imagenet")
    assert (config.model.cam_head, config.model.cam_output_stride) == ("largefov", 8)
    assert config.model.seg_output_stride == 8 and config.mine.steps == 3
    cfg = config.train
    assert (cfg.iterations, cfg.batch_size, cfg.crop_size) == (6000, 20, 321)
    assert (cfg.lr, cfg.new_layer_lr_mult, cfg.momentum, cfg.weight_decay) == (
        1e-3,
        10.0,
        0.9,
        5e-4,
    )
    assert (cfg.schedule, cfg.step_size, cfg.step_gamma) == ("step", 2000, 0.1)


def test_voc_preset_spends_2000_iterations_at_each_of_three_rates():
    """The Trainer's LambdaLR gives iteration i (0-based) the rate lr * factor(i)."""
    config = load_config(PRESET)
    rates = Counter(
        round(config.train.lr * learning_rate_factor(config, i), 12)
        for i in range(config.train.iterations)
    )
    assert rates == {1e-3: 2000, 1e-4: 2000, 1e-5: 2000}


def test_cam_head_setting():
    assert load_config(None).model.cam_head == "conv"
    assert load_config(None, ["model.cam_head=largefov"]).model.cam_head == "largefov"
    with pytest.raises(UserError, match=r"model\.cam_head"):
        load_config(None, ["model.cam_head=fc"])
