from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, DEMO

from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.layout import training_settings
from aepsl.record import save_config


@pytest.mark.parametrize(
    "name", ["demo.yaml", "demo_tiny.yaml", "own_data.yaml", "voc_vgg16.yaml", "coco_vgg16.yaml"]
)
def test_presets_load(name):
    config = load_config(CONFIGS / name)
    assert config.mine.steps == 3


def test_overrides_apply_with_yaml_types():
    config = load_config(
        DEMO,
        ["mine.steps=4", "data.root=/x", "mine.cam_flip=true", "mine.cam_scales=[1.0, 0.5]"],
    )
    assert config.mine.steps == 4
    assert config.data.root == "/x"
    assert config.mine.cam_flip is True
    assert config.mine.cam_scales == [1.0, 0.5]


def test_unknown_key_names_closest():
    with pytest.raises(UserError, match=r"unknown config key 'mine\.step'.*'mine\.steps'"):
        load_config(None, ["mine.step=4"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  rot: /x\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown config key 'data\.rot'.*'data\.root'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("mine.steps=abc", "mine.steps"),
        ("mine.threshold=1.5", "mine.threshold"),
        ("precision=fp64", "precision"),
        ("mine.steps=0", "mine.steps"),
    ],
)
def test_wrong_type_or_range(override, key):
    with pytest.raises(UserError, match=f"config key '{key}'"):
        load_config(None, [override])


def test_error_is_one_line():
    with pytest.raises(UserError) as info:
        load_config(None, ["mine.threshold=2"])
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listing)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(evil)


def test_saved_config_has_versions_and_round_trips(tmp_path):
    config = load_config(DEMO, ["mine.steps=2"])
    path = save_config(config, tmp_path)
    saved = yaml.safe_load(path.read_text())
    assert set(saved["versions"]) >= {"aepsl", "torch", "torchvision"}
    assert saved["runtime"]["precision"] in {"fp32", "bf16"}  # auto resolved (no CUDA in tests)
    del saved["versions"], saved["runtime"]
    assert load_config(None, []).model_validate(saved) == config


def test_configuration_reference_documents_every_key():
    from aepsl.config import ALL_KEYS

    reference = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [key for key in ALL_KEYS if key.rsplit(".", 1)[-1] not in reference]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize(
    ("precision", "device", "cuda", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("auto", "auto", False, False, False, "fp32"),  # AVX2-only CPU: emulated bf16 is slow
        ("auto", "auto", False, False, True, "bf16"),  # AVX-512 / AMX CPU
        ("auto", "auto", True, True, False, "bf16"),  # Ampere or newer GPU
        ("auto", "auto", True, False, True, "fp16"),  # older GPU, with a grad scaler
        ("auto", "cpu", True, True, False, "fp32"),  # device=cpu on a GPU machine
        ("bf16", "auto", False, False, False, "bf16"),  # an explicit choice is kept
    ],
)
def test_auto_precision_follows_the_hardware(
    monkeypatch, precision, device, cuda, cuda_bf16, cpu_bf16, expected
):
    import torch

    from aepsl import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: cpu_bf16)
    config = load_config(None, [f"precision={precision}", f"device={device}"])
    assert runtime.effective_precision(config) == expected
    assert training_settings(config, "mine")["precision"] == expected


@pytest.mark.parametrize(
    "override, key",
    [
        ("mine.cam_scales=[]", "mine.cam_scales"),
        ("mine.cam_scales=[0.5, -1]", "mine.cam_scales.1"),
        ("predict.scales=[]", "predict.scales"),
        ("predict.scales=[0]", "predict.scales.0"),
        ("predict.scales=[100]", "predict.scales.0"),
        ("train.scale_range=[1.3, 0.7]", "train.scale_range"),
        ("train.scale_range=[0, 1]", "train.scale_range.0"),
        ("seed=-1", "seed"),
        ("seed=4294967296", "seed"),
        ("mine.lr=.inf", "mine.lr"),
        ("mine.momentum=.nan", "mine.momentum"),
        ("data.root=''", "data.root"),
        ("data.val_split=''", "data.val_split"),
        ("data.max_pixels=0", "data.max_pixels"),
        ("train.psl_warmup=6000", "train.psl_warmup"),
        ("model.weights=''", "model.weights"),
    ],
)
def test_values_that_would_fail_in_a_stage_fail_at_load(override, key):
    """Each passed the schema before and crashed (or did nothing) later; now one line, at load."""
    with pytest.raises(UserError, match=f"^command line: config key '{key}': ") as info:
        load_config(None, [override])
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=4294967295", "train.scale_range=[1.0, 1.0]", "predict.scales=[0.5, 1, 1.5]"],
        ["train.psl=false", "train.psl_warmup=6000"],  # warmup is unused without PSL
        ["train.iterations=10", "train.psl_warmup=9"],
    ],
)
def test_edge_values_still_load(overrides):
    load_config(None, overrides)


def test_a_config_changes_nothing_in_the_process():
    """Validating a config sets no reader limit and imports no network code."""
    import subprocess
    import sys

    import aepsl.io

    before = aepsl.io.max_pixels()
    load_config(None, ["data.max_pixels=1234", "data.mask_cache=/tmp/elsewhere"])
    assert aepsl.io.max_pixels() == before
    code = "import sys; from aepsl.config import Config; Config(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_pixel_limit_is_scoped():
    import aepsl.io

    before = aepsl.io.max_pixels()
    with aepsl.io.pixel_limit(1234):
        assert aepsl.io.max_pixels() == 1234
    assert aepsl.io.max_pixels() == before


@pytest.mark.parametrize(
    "text",
    [
        "mine:\n  cam_scales: &s [1.0]\npredict:\n  scales: *s\n",
        "base: &b {steps: 2}\nmine:\n  <<: *b\n",
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
    ],
)
def test_yaml_aliases_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(
        UserError, match=r"invalid YAML at line \d+, column \d+ \(alias \*\w+ is not"
    ):
        load_config(path)


def test_yaml_anchor_without_alias_is_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mine:\n  cam_scales: &s [1.0, 0.5]\n")
    assert load_config(path).mine.cam_scales == [1.0, 0.5]


def test_long_values_are_clipped_in_the_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mine:\n  steps: " + "9x" * 50_000 + "\n")
    with pytest.raises(UserError, match=r"config key 'mine\.steps'.*\.\.\.\)$") as info:
        load_config(path)
    assert len(str(info.value)) < 300
