"""DeepLab-LargeFOV initialised as DeepLab did: fc6/fc7 decimated from VGG16's fc6/fc7, for the
segmentation network and the `largefov` CAM classifier; only the new layers train at 10x.

One random torchvision VGG16 state dict (fc layers included, 528 MB) is written once for the
module and read through model.weights=<file> and model.weights=imagenet (a fake cache)."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from aepsl.errors import UserError
from aepsl.models import build_classifier
from aepsl.models.backbones import vgg16_fc_to_large_fov
from aepsl.models.segnet import build_segnet
from aepsl.training import sgd

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    torch.manual_seed(0)
    state = models.vgg16(weights=None).state_dict()
    state["classifier.0.bias"].normal_()  # torchvision initialises biases to 0: make them
    state["classifier.3.bias"].normal_()  # distinguishable, or a wrong index would pass
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


def _assert_decimated(head: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every element of fc6 (1024 x 512 x 3 x 3) and fc7 (1024 x 1024) against its source,
    indexed in the flat 4096 x 25088 / 4096 x 4096 layout of torchvision's Linear weights."""
    fc6, fc7 = state["classifier.0.weight"], state["classifier.3.weight"]
    o, c, i, j = torch.meshgrid(
        torch.arange(1024), torch.arange(512), torch.arange(3), torch.arange(3), indexing="ij"
    )
    expected = fc6[4 * o, c * 49 + (3 * i) * 7 + 3 * j]  # pool5 cell (3i, 3j) of channel c
    assert torch.equal(head[0].weight, expected)
    assert head[0].weight.shape == (1024, 512, 3, 3)
    rows, cols = torch.meshgrid(torch.arange(1024), torch.arange(1024), indexing="ij")
    assert torch.equal(head[3].weight[:, :, 0, 0], fc7[4 * rows, 4 * cols])
    assert torch.equal(head[0].bias, state["classifier.0.bias"][torch.arange(0, 4096, 4)])
    assert torch.equal(head[3].bias, state["classifier.3.bias"][torch.arange(0, 4096, 4)])
    # spot checks written out by hand: output 1 = fc6 row 4, tap (2, 1) of channel 5
    assert head[0].weight[1, 5, 2, 1] == fc6[4, 5 * 49 + 6 * 7 + 3]
    assert head[0].weight[1023, 511, 2, 2] == fc6[4092, 511 * 49 + 48]
    assert head[3].weight[7, 9, 0, 0] == fc7[28, 36]


def _ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


def test_segnet_fc6_fc7_are_vgg16s_decimated_and_train_at_the_base_rate(vgg16_file):
    path, state = vgg16_file
    net = build_segnet("vgg16", str(path), NUM_CLASSES)
    assert net.head_pretrained
    _assert_decimated(net.head, state)
    assert torch.equal(net.backbone[28].weight, state["features.28.weight"])
    assert net.head[0].dilation == (12, 12)
    new = _ids(net.new_parameters())
    assert new == _ids([*net.classifier.parameters(), *net.class_branch.parameters()])
    optimizer = sgd(net, 1e-3, 1e-2, 0.9, 5e-4)
    base, ten_x = optimizer.param_groups
    assert base["lr"] == 1e-3 and ten_x["lr"] == 1e-2
    assert _ids(net.head.parameters()) <= _ids(base["params"])
    assert _ids(ten_x["params"]) == new
    with torch.no_grad():
        scores, _ = net.eval()(torch.rand(1, 3, 64, 64))
    assert scores.shape == (1, NUM_CLASSES + 1, 8, 8)


def test_imagenet_weights_from_the_cache_are_decimated_too(vgg16_file, monkeypatch):
    path, state = vgg16_file
    (path.parent / "checkpoints").mkdir(exist_ok=True)
    cached = path.parent / "checkpoints" / path.name  # torchvision's file name
    if not cached.exists():
        cached.symlink_to(path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path.parent))
    net = build_segnet("vgg16", "imagenet", NUM_CLASSES, output_stride=16)
    _assert_decimated(net.head, state)
    assert net.head[0].dilation == (6, 6)  # the same 96-pixel taps at stride 16


def test_largefov_cam_classifier_shares_the_initialisation(vgg16_file):
    path, state = vgg16_file
    model = build_classifier("vgg16", str(path), NUM_CLASSES, output_stride=8, cam_head="largefov")
    _assert_decimated(model.extra, state)
    assert model.output_stride == 8 and model.extra[0].dilation == (12, 12)
    assert model.cam.weight.shape == (NUM_CLASSES, 1024, 1, 1)
    assert _ids(model.new_parameters()) == _ids(model.cam.parameters())
    with torch.no_grad():
        maps = model.eval().class_maps(torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, NUM_CLASSES, 8, 8)
    conv = build_classifier("vgg16", str(path), NUM_CLASSES)  # today's head: new layers
    assert _ids(conv.new_parameters()) == _ids([*conv.extra.parameters(), conv.cam.weight])


def test_without_weights_the_heads_start_random_and_new():
    net = build_segnet("vgg16", "none", NUM_CLASSES)
    assert not net.head_pretrained
    assert _ids(net.head.parameters()) <= _ids(net.new_parameters())
    for backbone in ("vgg16", "resnet50"):
        model = build_classifier(backbone, "none", NUM_CLASSES, cam_head="largefov")
        assert _ids(model.extra.parameters()) <= _ids(model.new_parameters())


def test_a_file_without_fc_layers_leaves_the_head_random(vgg16_file, tmp_path):
    _, state = vgg16_file
    path = tmp_path / "features.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    net = build_segnet("vgg16", str(path), NUM_CLASSES)
    assert not net.head_pretrained
    assert _ids(net.head.parameters()) <= _ids(net.new_parameters())


def test_fc_layers_of_another_shape_are_a_one_line_error():
    state = {
        "classifier.0.weight": torch.zeros(4096, 100),
        "classifier.0.bias": torch.zeros(4096),
        "classifier.3.weight": torch.zeros(4096, 4096),
        "classifier.3.bias": torch.zeros(4096),
    }
    with pytest.raises(UserError, match=r"expected \(4096, 25088\) and \(4096, 4096\)"):
        vgg16_fc_to_large_fov(state)
    assert vgg16_fc_to_large_fov({}) is None
