"""The run layout: every path of a run folder in one place, the manifests and the hash chain."""

import json

import numpy as np
import pytest
from helpers import DEMO_FULL

from aepsl.config import load_config
from aepsl.layout import RunLayout, stage_digests


def test_paths_are_the_documented_ones(tmp_path):
    run = RunLayout(tmp_path, load_config(None))
    assert run.config_file == tmp_path / "config.yaml"
    assert run.step(2).region("a") == tmp_path / "mine" / "step2" / "regions" / "a.png"
    assert run.step(2).cam("a") == tmp_path / "mine" / "step2" / "cams" / "a.npz"
    assert run.step(3).classifier == tmp_path / "mine" / "step3" / "classifier.pt"
    assert run.union_region("a") == tmp_path / "mine" / "regions" / "a.png"
    assert run.saliency_map("a") == tmp_path / "saliency" / "a.png"
    assert run.pseudo_label("a") == tmp_path / "labels" / "a.png"
    assert run.model == tmp_path / "train" / "model.pt"
    assert (run.predict, run.predict_crf) == (tmp_path / "predict", tmp_path / "predict_crf")
    assert run.report == tmp_path / "report.html"
    for stage in ("mine", "labels", "train"):
        assert run.folder(stage) == tmp_path / stage


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("mine.threshold=0.7", {"mine", "labels", "train"}),
        ("model.backbone=tiny", {"mine", "labels", "train"}),
        ("seed=1", {"mine", "labels", "train"}),
        ("saliency.max_side=100", {"labels", "train"}),
        ("labels.bg_threshold=0.3", {"labels", "train"}),
        ("train.iterations=10", {"train"}),
        ("mine.min_positives=100", {"mine", "labels", "train"}),
        ("train.min_iterations=100", set()),  # no train.epochs: nothing for it to raise
        ("train.epochs=10", {"train"}),
        ("mine.visualise=0", set()),
        ("mine.checkpoint_every=3", set()),
        ("train.checkpoint_every=7", set()),
        ("data.num_workers=2", set()),
        ("data.max_pixels=1000", set()),
        ("predict.flip=true", set()),
    ],
)
def test_a_setting_changes_its_stage_and_every_stage_after(override, changed):
    """The chain: each stage's hash covers its settings and the hash of the stage before."""
    base = stage_digests(load_config(None))
    other = stage_digests(load_config(None, [override]))
    assert {stage for stage in base if base[stage] != other[stage]} == changed


def test_claim_resumes_skips_or_starts_again(tmp_path, capsys):
    run = RunLayout(tmp_path, load_config(None))
    assert run.claim("labels") is False  # new: claimed, not finished
    (run.labels / "partial.png").write_bytes(b"x")
    assert run.claim("labels") is False and (run.labels / "partial.png").is_file()  # resume
    run.mark_complete("labels")
    assert json.loads((run.labels / "manifest.json").read_text())["complete"] is True
    assert run.claim("labels") is True  # finished with these settings: skip
    changed = RunLayout(tmp_path, load_config(None, ["labels.bg_threshold=0.3"]))
    assert changed.claim("labels") is False
    assert not (run.labels / "partial.png").exists()  # other settings: started again
    assert "settings changed" in capsys.readouterr().out


def test_settings_added_later_keep_the_hashes_of_earlier_runs_at_their_defaults():
    """Pinned before mine.min_positives and train.min_iterations existed: a run folder made
    then is still finished for the same settings."""
    assert stage_digests(load_config(None, ["precision=fp32"])) == {
        "mine": "7c8835860f331c5a",
        "labels": "a9d3572ddaa3de5c",
        "train": "e6a29a6dad59a63c",
    }
    # the demo preset's lengths when the hashes were pinned
    lengths = ["mine.epochs=5", "train.epochs=17.78"]
    demo = load_config(DEMO_FULL, ["data.root=/x", "precision=fp32", *lengths])
    assert stage_digests(demo) == {
        "mine": "85c831da31b4a3fe",
        "labels": "623e725d18c5e87f",
        "train": "565fe812b5809969",
    }
    floor = load_config(
        DEMO_FULL, ["data.root=/x", "precision=fp32", *lengths, "train.min_iterations=500"]
    )
    assert stage_digests(floor)["train"] != stage_digests(demo)["train"]  # demo has epochs


def test_written_files_honour_the_umask(tmp_path):
    """As `cp` would create them: 0644 under umask 022, 0664 under 002 (not mkstemp's 0600)."""
    import os

    from aepsl.io import write_index_png, write_json

    before = os.umask(0o002)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_index_png(tmp_path / "b.png", np.zeros((4, 4), np.uint8))
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o664
        assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o664
        os.umask(0o022)
        write_json(tmp_path / "a.json", {"x": 2})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(before)
