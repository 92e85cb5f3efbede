"""The segmentation network: output shapes and stride, weight loading, new layers."""

import pytest
import torch
from torchvision import models

from aepsl.errors import UserError
from aepsl.models.segnet import build_segnet

NUM_CLASSES = 3


@pytest.mark.parametrize("backbone", ["tiny", "vgg16", "resnet50", "resnet101"])
def test_scores_at_output_stride_8_and_class_logits(backbone):
    net = build_segnet(backbone, "none", NUM_CLASSES).eval()
    with torch.no_grad():
        scores, class_logits = net(torch.randn(1, 3, 64, 64))
    assert net.output_stride == 8
    assert scores.shape == (1, NUM_CLASSES + 1, 8, 8)
    assert class_logits.shape == (1, NUM_CLASSES)
    new = {id(p) for p in net.new_parameters()}
    layers = (net.head, net.classifier, net.class_branch)  # fc6/fc7 start random: new too
    assert new == {id(p) for layer in layers for p in layer.parameters()}
    assert torch.all(net.classifier.bias == 0)


def test_vgg16_loads_a_torchvision_file_into_the_dilated_features(tmp_path):
    state = models.vgg16().state_dict()
    # fc6/fc7's 120M parameters only bloat the file; fc8 stays as a head the loader must skip.
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.0", "classifier.3"))}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    net = build_segnet("vgg16", str(path), NUM_CLASSES)
    assert torch.equal(net.backbone[0].weight, state["features.0.weight"])
    assert torch.equal(net.backbone[28].weight, state["features.28.weight"])
    assert net.backbone[28].dilation == (2, 2)  # conv5_3 dilated, pool4/pool5 at stride 1
    assert net.backbone[23].stride == 1 and net.backbone[30].stride == 1


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone 'alexnet'"):
        build_segnet("alexnet", "none", NUM_CLASSES)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "efficientnet_lite0"])
def test_output_stride_16_keeps_the_parameters_and_the_field_of_view(backbone):
    if backbone == "efficientnet_lite0":
        pytest.importorskip("timm")
    fine = build_segnet(backbone, "none", NUM_CLASSES)
    coarse = build_segnet(backbone, "none", NUM_CLASSES, output_stride=16).eval()
    with torch.no_grad():
        scores, _ = coarse(torch.randn(1, 3, 64, 64))
    assert coarse.output_stride == 16 and scores.shape == (1, NUM_CLASSES + 1, 4, 4)
    coarse.load_state_dict(fine.state_dict())  # same parameters: a model.pt loads either way
    assert fine.head[0].dilation == (12, 12) and coarse.head[0].dilation == (6, 6)


def test_tiny_stays_at_output_stride_8():
    assert build_segnet("tiny", "none", NUM_CLASSES, output_stride=16).output_stride == 8


def test_load_segnet_builds_what_the_config_says(tmp_path):
    from aepsl.config import load_config
    from aepsl.models.segnet import load_segnet

    path = tmp_path / "model.pt"
    torch.save(build_segnet("resnet50", "none", NUM_CLASSES).state_dict(), path)
    config = load_config(None, ["model.backbone=resnet50", "model.seg_output_stride=16"])
    assert load_segnet(path, config).output_stride == 16
    with pytest.raises(UserError, match=r"does not fit model\.backbone=vgg16"):
        load_segnet(path, load_config(None, ["model.backbone=vgg16"]))
    with pytest.raises(UserError, match="earlier version, without its settings; give the config"):
        load_segnet(path)


def test_model_file_builds_itself_and_refuses_a_disagreeing_config(tmp_path):
    """model.pt carries its settings: no config needed; a config that says otherwise is one
    line; one that does not set model keys is fine."""
    from aepsl.config import load_config
    from aepsl.models.saved import model_record, read_model_file
    from aepsl.models.segnet import load_segnet

    torch.manual_seed(0)
    net = build_segnet("resnet50", "none", NUM_CLASSES, output_stride=16)
    path = tmp_path / "model.pt"
    torch.save(model_record(net, "segnet", "resnet50", NUM_CLASSES), path)
    assert torch.load(path, weights_only=True)["aepsl_model"]["output_stride"] == 16
    loaded = load_segnet(path)
    assert loaded.output_stride == 16 and isinstance(loaded.backbone[7][0].conv2, torch.nn.Conv2d)
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert load_segnet(path, load_config(None, ["seed=3"])).output_stride == 16
    for override, said in [
        ("model.seg_output_stride=8", "model.seg_output_stride=16, but the config asks for 8"),
        ("model.backbone=vgg16", "model.backbone=resnet50, but the config asks for vgg16"),
    ]:
        with pytest.raises(UserError, match=f"model.pt: trained with {said}") as error:
            load_segnet(path, load_config(None, [override]))
        assert "\n" not in str(error.value)
    assert read_model_file(path)[0]["kind"] == "segnet"
