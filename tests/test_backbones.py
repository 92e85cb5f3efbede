"""Every classifier backbone: CAM shape and output stride, weights from a local file, and the
offline ImageNet error path (nothing is ever downloaded)."""

import importlib.util

import pytest
import torch
from torchvision import models

from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.models import build_classifier
from aepsl.models.backbones import REGISTRY, build_backbone

STRIDES = {"tiny": 8, "vgg16": 16, "resnet50": 16, "resnet101": 16, "efficientnet_lite0": 16}
HAVE_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.parametrize("backbone", list(STRIDES))
def test_cams_of_every_class_at_the_backbone_stride(backbone):
    if backbone == "efficientnet_lite0" and not HAVE_TIMM:
        pytest.skip("timm not installed (pip install 'aepsl[offline]')")
    torch.manual_seed(0)
    model = build_classifier(backbone, "none", 3).eval()
    with torch.no_grad():
        maps = model.class_maps(torch.randn(2, 3, 64, 64))
        logits = model(torch.randn(2, 3, 64, 64))
    side = 64 // STRIDES[backbone]
    assert maps.shape == (2, 3, side, side)
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "efficientnet_lite0"])
def test_cams_at_output_stride_8_keep_the_weights(backbone):
    if backbone == "efficientnet_lite0" and not HAVE_TIMM:
        pytest.skip("timm not installed (pip install 'aepsl[offline]')")
    torch.manual_seed(0)
    coarse = build_classifier(backbone, "none", 3)
    torch.manual_seed(0)
    fine = build_classifier(backbone, "none", 3, output_stride=8).eval()
    assert fine.backbone.state_dict().keys() == coarse.backbone.state_dict().keys()
    with torch.no_grad():
        assert fine.class_maps(torch.randn(1, 3, 64, 64)).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("backbone", ["tiny", "resnet50"])
def test_backbone_weights_from_a_local_state_dict(backbone, tmp_path):
    torch.manual_seed(1)
    source, _ = build_backbone(backbone, "none")
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    loaded, _ = build_backbone(backbone, str(path))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_torchvision_resnet101_file_maps_onto_the_features(tmp_path):
    whole = models.resnet101().state_dict()  # torchvision's key layout, as in its cache
    path = tmp_path / "resnet101.pth"
    torch.save(whole, path)
    features, channels = build_backbone("resnet101", str(path))
    assert channels == 2048
    assert torch.equal(features[0].weight, whole["conv1.weight"])
    assert torch.equal(features[7][2].conv3.weight, whole["layer4.2.conv3.weight"])


def test_imagenet_weights_missing_offline_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match=r"resnet101-[0-9a-f]+\.pth: ImageNet weights for resnet"):
        build_backbone("resnet101", "imagenet")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_entry_builds_at_both_strides_and_is_a_config_choice(name):
    """Every registry entry: features of its channel count at stride 16 and 8 (tiny: always
    8), a segmentation head of its channel count, and a valid `model.backbone`."""
    if name == "efficientnet_lite0" and not HAVE_TIMM:
        pytest.skip("timm not installed (pip install 'aepsl[offline]')")
    spec = REGISTRY[name]
    for stride in (16, 8):
        torch.manual_seed(0)
        net, channels = build_backbone(name, "none", stride)
        with torch.no_grad():
            out = net.eval()(torch.randn(1, 3, 64, 64))
        expected = 8 if spec.native_stride == 8 else stride
        assert channels == spec.channels and out.shape == (
            1,
            channels,
            64 // expected,
            64 // expected,
        )
    head = spec.seg_head(spec.channels, 12)
    assert head(torch.randn(1, spec.channels, 8, 8)).shape[1] == spec.seg_head_channels
    assert load_config(None, [f"model.backbone={name}"]).model.backbone == name


def test_a_wrong_shape_in_a_weights_file_is_one_line_naming_the_key(tmp_path):
    net, _ = build_backbone("tiny", "none")
    state = net.state_dict()
    state["0.0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"'0\.0\.weight' is \(3, 3\) in the file") as error:
        build_backbone("tiny", str(tmp_path / "bad.pt"))
    assert "\n" not in str(error.value)
