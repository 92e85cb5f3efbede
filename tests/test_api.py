"""The Python API, presets by name, and ONNX export: used as a user would, outside the
repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder_dataset
from helpers import TINY_MINE, TINY_TRAIN, overrides
from PIL import Image

import aepsl
from aepsl.cli import main
from aepsl.presets import preset_names

DOCS = Path(__file__).parent.parent / "docs"
TINY = overrides(TINY_MINE, TINY_TRAIN, "mine.steps=1", "model.backbone=tiny", "model.weights=none")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of the own_data preset, by name, from a folder outside the repository."""
    base = tmp_path_factory.mktemp("api")
    data = make_folder_dataset(base / "data", n=16, size=32)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "aepsl", "run", "own_data", f"data.root={data}", *TINY]
    result = subprocess.run(
        [*command, "--out", "run"], cwd=base, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (base / "run" / "train" / "model.pt").is_file()
    return base, data


def test_presets_are_listed_and_printed(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    assert all("Backbone" in line for line in lines)
    assert main(["presets", "own_data"]) == 0
    shipped = Path(aepsl.__file__).parent / "configs" / "own_data.yaml"
    assert capsys.readouterr().out == shipped.read_text()


def test_an_unknown_preset_lists_the_presets(capsys):
    assert main(["data-info", "own_dta"]) == 2
    err = capsys.readouterr().err
    assert "own_dta: config file not found and no preset of that name" in err
    assert "own_data" in err


def test_a_file_named_like_a_preset_wins_with_a_note(tmp_path, capsys, monkeypatch):
    data = make_folder_dataset(tmp_path / "data")
    (tmp_path / "own_data").write_text(f"data:\n  root: {data}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["data-info", "own_data"]) == 0
    out = capsys.readouterr().out
    assert "note: own_data is a file here and a preset's name; using the file" in out
    assert "2 classes" in out


def test_run_by_preset_name_from_outside_the_repository(trained):
    base, _ = trained
    saved = (base / "run" / "config.yaml").read_text()
    assert "efficientnet" not in saved  # the overrides reached the preset
    assert "psl: false" in saved  # own_data's own setting


def test_api_runs_a_stage_and_returns_what_it_wrote(trained):
    base, data = trained
    config = aepsl.resolve_config("own_data", data__root=str(data))
    result = aepsl.run_stage("labels", config, base / "run", **_kwargs(TINY))
    assert result.folder == base / "run" / "labels"
    assert result.metrics["mIoU"] is not None  # skipped: finished, its metrics returned


def test_api_errors_are_user_errors(tmp_path):
    with pytest.raises(aepsl.UserError, match=r"unknown config key 'mine\.step'"):
        aepsl.run_stage("mine", "demo_tiny", tmp_path / "run", mine__step=2)


def test_segmenter_predicts_images_in_memory(trained):
    base, data = trained
    segmenter = aepsl.load_segmenter(base / "run" / "train" / "model.pt", device="cpu")
    assert segmenter.num_classes == 2
    path = sorted((data / "images").iterdir())[0]
    image = Image.open(path)
    labels = segmenter.predict(image)
    assert labels.dtype == np.uint8 and labels.shape == (image.height, image.width)
    array = np.asarray(image.convert("RGB"))
    assert np.array_equal(segmenter.predict(array), labels)
    batch = segmenter.predict(np.stack([array, array]))
    assert len(batch) == 2 and all(np.array_equal(b, labels) for b in batch)
    (pair,) = segmenter.predict([array], scores=True)
    assert pair[1].shape == (3, *labels.shape)
    assert np.array_equal(pair[1].argmax(0), labels)
    refined = segmenter.predict(array, crf=True)
    assert refined.shape == labels.shape
    with pytest.raises(aepsl.UserError, match="dtype float64"):
        segmenter.predict(array.astype(float))


def test_the_documented_api_example_runs(tmp_path, monkeypatch):
    text = (DOCS / "api.md").read_text()
    example = re.search(r"## Example.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(DOCS / "api.md"), "exec"), {"__name__": "__example__"})
    assert (tmp_path / "runs" / "api" / "report.html").is_file()


def test_onnx_export_round_trips(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from aepsl.export import ExportedSegNet
    from aepsl.models.segnet import load_segnet

    base, _ = trained
    checkpoint = base / "run" / "train" / "model.pt"
    out = tmp_path / "model.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    session = ort.InferenceSession(str(out))
    reference = ExportedSegNet(load_segnet(checkpoint)).eval()
    rng = np.random.default_rng(0)
    worst, same, total = 0.0, 0, 0
    for batch, height, width in [(1, 32, 32), (2, 45, 61), (1, 96, 40)]:
        images = rng.random((batch, 3, height, width), dtype=np.float32)
        probs, labels = session.run(None, {"images": images})
        with torch.no_grad():
            probs_t, labels_t = reference(torch.from_numpy(images))
        assert probs.shape == (batch, 3, height, width) and labels.dtype == np.uint8
        worst = max(worst, float(np.abs(probs - probs_t.numpy()).max()))
        same += int((labels == labels_t.numpy()).sum())
        total += labels.size
    print(
        f"ONNX Runtime vs PyTorch: max |probability difference| {worst:.2e}, "
        f"labels equal {same}/{total}"
    )
    assert worst < 1e-4
    assert same / total >= 0.999


def test_export_refuses_a_classifier_file(trained, tmp_path, capsys):
    base, _ = trained
    wrong = base / "run" / "mine" / "step1" / "classifier.pt"
    argv = ["export", "--checkpoint", str(wrong), "--out", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    assert "not an aepsl segmentation checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def _kwargs(pairs: list[str]) -> dict[str, str]:
    """key=value overrides as API keywords (values as text: the config parses them)."""
    return {key.replace(".", "__"): value for key, _, value in (p.partition("=") for p in pairs)}


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch, capsys):
    data = make_folder_dataset(tmp_path / "own_data")
    monkeypatch.chdir(tmp_path)
    assert main(["data-info", "own_data", f"data.root={data}"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_overrides_on_a_config_leave_its_unset_keys_unset(trained):
    """Only what the user set counts as asked: a model file then builds as it says."""
    base, _ = trained
    config = aepsl.resolve_config(aepsl.resolve_config(None), predict__flip=True)
    assert config.predict.flip and "backbone" not in config.model.model_fields_set
    segmenter = aepsl.load_segmenter(base / "run" / "train" / "model.pt", "cpu", config)
    assert segmenter.config.predict.flip and segmenter.config.device == "cpu"


def test_export_never_writes_over_its_checkpoint(trained, tmp_path, capsys):
    base, _ = trained
    copy = tmp_path / "model.pt"
    copy.write_bytes((base / "run" / "train" / "model.pt").read_bytes())
    before = copy.read_bytes()
    assert main(["export", "--checkpoint", str(copy), "--out", str(copy)]) == 2
    assert "--out is the checkpoint itself" in capsys.readouterr().err
    assert copy.read_bytes() == before


@pytest.mark.parametrize(
    "out, message",
    [("", "--out is empty"), ("adir", "--out is a folder; name the ONNX file to write")],
)
def test_export_to_an_empty_or_folder_out_is_one_line(
    trained, tmp_path, capsys, monkeypatch, out, message
):
    base, _ = trained
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["export", "--checkpoint", str(base / "run" / "train" / "model.pt"), "--out", out]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]
