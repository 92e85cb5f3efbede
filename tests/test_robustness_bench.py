"""benchmarks/robustness.py: each variant's `aepsl run` overrides, so that a lever built on a
finished `after` reuses its mining (same settings hash) and changes only what it names."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from aepsl.config import load_config
from aepsl.layout import stage_digests

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
spec = importlib.util.spec_from_file_location("robustness", SCRIPT)
robustness = importlib.util.module_from_spec(spec)
sys.modules["robustness"] = robustness  # its dataclasses look their module up
spec.loader.exec_module(robustness)


def _digests(variant: str, data: Path) -> dict[str, str]:
    preset = load_config(robustness.PRESET, ["data.root=."])
    overrides = robustness.variant_overrides(variant, 1.0, preset, data)
    return stage_digests(load_config(robustness.PRESET, [f"data.root={data}", *overrides]))


def test_label_crf_levers_reuse_afters_mining(tmp_path):
    after = _digests("after", tmp_path)
    for variant, mode in robustness.LABEL_CRF.items():
        lever = _digests(variant, tmp_path)
        assert lever["mine"] == after["mine"], variant  # the copied mine/ is skipped
        assert lever["labels"] != after["labels"], variant
        preset = load_config(robustness.PRESET, ["data.root=."])
        assert f"labels.crf={mode}" in robustness.variant_overrides(variant, 1.0, preset, tmp_path)


def test_nofill_lever_reuses_afters_mining(tmp_path):
    after, nofill = _digests("after", tmp_path), _digests("nofill", tmp_path)
    assert nofill["mine"] == after["mine"]  # after keeps its CAMs: the copied mine/ is skipped
    assert nofill["labels"] != after["labels"]
    preset = load_config(robustness.PRESET, ["data.root=."])
    assert preset.labels.salient_fill  # the preset fills; the lever leaves them unlabelled
    overrides = robustness.variant_overrides("nofill", 1.0, preset, tmp_path)
    assert "labels.salient_fill=false" in overrides
    # a user turning the preset's fill off re-runs labels and train, not mining
    own, off = (
        stage_digests(load_config(robustness.PRESET, ["data.root=.", *extra]))
        for extra in ([], ["labels.salient_fill=false"])
    )
    assert own["mine"] == off["mine"] and own["labels"] != off["labels"]


def test_only_names_variants_of_the_grid(tmp_path):
    argv = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "crffill", "--quick"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--only: ['crffill'] not among this grid's ['sup', 'after', 'before']" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before any data was made


def test_a_comparison_with_a_variant_left_out_is_said_not_made(capsys):
    row = {"crf": 0.5, "val": 0.4, "floor": 0.1, "collapsed": False, "one_class": False}
    cell = robustness.Cell(64, 3, 2, "synth")
    results = {cell: {"after": [row | {"warnings": []}], "gain": []}}
    robustness.verdicts(results, [0], ("psl", "after"), {"steps1"})
    out = capsys.readouterr().out
    assert "3 erasing steps vs 1 step: not compared (steps1 not in --only)" in out
    assert "PSL" not in out  # psl was not asked for at all: nothing to say


def test_ms1_starts_from_afters_step1_classifier(tmp_path):
    data = tmp_path / "data"
    preset = load_config(robustness.PRESET, ["data.root=."])
    overrides = robustness.variant_overrides("ms1", 1.0, preset, data)
    assert "mine.steps=1" in overrides and "mine.cam_flip=true" in overrides
    config = load_config(robustness.PRESET, [f"data.root={data}", *overrides])
    assert config.mine.cam_scales == [1.0, 0.5, 1.5, 2.0]
    after, run = tmp_path / "after", tmp_path / "ms1"
    step1 = after / "mine" / "step1"
    step1.mkdir(parents=True)
    (step1 / "classifier.pt").write_bytes(b"weights")
    (step1 / "train.json").write_text('{"train_loss": 0.1}')
    robustness.copy_step1_classifier(after, run, config)
    assert not run.exists()  # after has not finished: nothing to start from
    (after / "train").mkdir()
    (after / "train" / "metrics.json").write_text("{}")
    robustness.copy_step1_classifier(after, run, config)
    assert (run / "mine" / "step1" / "classifier.pt").read_bytes() == b"weights"
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    # claimed for ms1's own settings and unfinished: `aepsl run` resumes there, loading the copy
    assert manifest["settings_hash"] == stage_digests(config)["mine"]
    assert not manifest["complete"]
    # ms1 asked again with other settings (e.g. another --epochs-scale): the folder the old
    # settings claimed is emptied and the classifier copied again, not trained anew
    (run / "mine" / "step1" / "classifier.pt").write_bytes(b"stale")
    other = load_config(robustness.PRESET, [f"data.root={data}", *overrides, "mine.epochs=2"])
    robustness.copy_step1_classifier(after, run, other)
    assert (run / "mine" / "step1" / "classifier.pt").read_bytes() == b"weights"
    manifest = json.loads((run / "mine" / "manifest.json").read_text())
    assert manifest["settings_hash"] == stage_digests(other)["mine"]
