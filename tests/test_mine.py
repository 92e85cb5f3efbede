"""`aepsl mine` end to end on a tiny dataset: outputs, formats, union, skip and resume."""

import json
import re

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY_MINE, overrides

from aepsl.cli import main
from aepsl.config import load_config
from aepsl.io import read_index_png
from aepsl.mine.stage import run_mine
from aepsl.models import build_classifier
from aepsl.models.saved import read_model_file

TINY = overrides(TINY_MINE, "mine.epochs=2")


def _config(root, *extra):
    return load_config(DEMO, [f"data.root={root}", *TINY, *extra])


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    from conftest import make_folder_dataset

    base = tmp_path_factory.mktemp("mine")
    root = make_folder_dataset(base / "data", n=8)
    out = base / "run"
    code = main(
        ["mine", str(DEMO), f"data.root={root}", *TINY, "mine.save_cams=true", "--out", str(out)]
    )
    assert code == 0
    return root, out


def test_outputs_exist_and_load_safely(mined):
    _, out = mined
    metrics = json.loads((out / "mine" / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3]
    for step in metrics["steps"]:
        assert step["train_loss"] > 0
        assert 0 <= step["union_regions"]["precision"] <= 1
        assert step["val_mAP"] is not None
    settings, state = read_model_file(out / "mine" / "step1" / "classifier.pt")
    assert settings == {
        "kind": "cam_classifier",
        "backbone": "tiny",
        "output_stride": 8,
        "num_classes": 2,
        "cam_head": "conv",
    }
    build_classifier("tiny", "none", 2).load_state_dict(state)
    assert (out / "config.yaml").is_file()
    assert not (out / "mine" / "step1" / "checkpoint.pt").exists()
    assert len(list((out / "mine" / "step2" / "vis").glob("*.png"))) > 0


def test_region_maps_use_image_classes_only(mined):
    root, out = mined
    train = (root / "splits" / "train.txt").read_text().split()
    labels = dict(line.split(",") for line in (root / "labels.csv").read_text().splitlines()[1:])
    names = {"square": 1, "disc": 2}
    for image_id in train:
        allowed = {0, 255} | {names[n] for n in labels[image_id].split()}
        for step in (1, 2, 3):
            regions = read_index_png(out / "mine" / f"step{step}" / "regions" / f"{image_id}.png")
            assert regions.shape == (32, 32)
            assert set(np.unique(regions).tolist()) <= allowed


def test_union_is_union_of_steps(mined):
    _, out = mined
    for path in (out / "mine" / "regions").glob("*.png"):
        union = read_index_png(path)
        steps = [
            read_index_png(out / "mine" / f"step{s}" / "regions" / path.name) for s in (1, 2, 3)
        ]
        mined_any = np.any([s != 0 for s in steps], axis=0)
        assert np.array_equal(union != 0, mined_any)


def test_saved_cams_format(mined):
    _, out = mined
    cams = np.load(out / "mine" / "step1" / "cams" / "img2.npz", allow_pickle=False)
    assert cams["keys"].tolist() == [1, 2]
    assert cams["cams"].dtype == np.float16 and cams["cams"].shape == (2, 32, 32)
    assert cams["cams"].min() >= 0 and cams["cams"].max() <= 1.0


def test_rerun_skips_finished_steps(mined, capsys):
    root, out = mined
    before = (out / "mine" / "step1" / "classifier.pt").stat().st_mtime_ns
    run_mine(_config(root, "mine.save_cams=true"), out)
    assert (out / "mine" / "step1" / "classifier.pt").stat().st_mtime_ns == before
    assert "train" not in capsys.readouterr().err  # no progress bar: nothing was trained


def test_interrupted_step_resumes_to_the_same_result(tmp_path, monkeypatch):
    from conftest import make_folder_dataset

    from aepsl import training

    root = make_folder_dataset(tmp_path / "data", n=8)
    config = _config(root, "mine.steps=2", "mine.epochs=3")
    run_mine(config, tmp_path / "full")

    save = training.save_checkpoint

    def killed_after_first_checkpoint_of_step2(path, state):
        save(path, state)
        if path.name == "checkpoint.pt" and path.parent.name == "step2":
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_after_first_checkpoint_of_step2)
    with pytest.raises(KeyboardInterrupt):
        run_mine(config, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "mine" / "step2" / "checkpoint.pt").is_file()
    monkeypatch.undo()
    run_mine(config, tmp_path / "resumed")

    full, resumed = tmp_path / "full" / "mine", tmp_path / "resumed" / "mine"
    for name, weight in read_model_file(full / "step2" / "classifier.pt")[1].items():
        other = read_model_file(resumed / "step2" / "classifier.pt")[1][name]
        assert torch.equal(weight, other), name
    for path in (full / "regions").glob("*.png"):
        assert np.array_equal(read_index_png(path), read_index_png(resumed / "regions" / path.name))


def test_labels_without_saliency_use_saved_cams(mined):
    root, out = mined
    settings = [f"data.root={root}", *TINY, "mine.save_cams=true", "saliency.source=none"]
    assert main(["labels", str(DEMO), *settings, "--out", str(out)]) == 0
    metrics = json.loads((out / "labels" / "metrics.json").read_text())
    assert metrics["saliency_source"] == "none" and 0 < metrics["labelled_fraction"] <= 1


def test_salient_fill_reads_the_kept_cams(mined, capsys):
    """labels.salient_fill keeps the CAMs as mine.save_cams=true does: the same mining (not
    redone), and the labels read its steps' CAMs."""
    root, out = mined
    settings = [f"data.root={root}", *TINY, "labels.salient_fill=true"]
    assert main(["labels", str(DEMO), *settings, "--out", str(out)]) == 0
    assert f"{out / 'mine'}: settings changed" not in capsys.readouterr().out
    metrics = json.loads((out / "labels" / "metrics.json").read_text())
    assert metrics["salient_fill"] == {"threshold": 0.3} and 0 < metrics["labelled_fraction"] <= 1


def test_changed_setting_mines_again(mined, capsys):
    root, out = mined
    run_mine(_config(root, "mine.save_cams=true", "mine.threshold=0.3", "mine.steps=1"), out)
    assert "settings changed" in capsys.readouterr().out
    assert not (out / "mine" / "step2").exists()


def test_diverging_classifier_stops_with_one_line(folder_dataset, tmp_path, capsys):
    argv = [
        "mine",
        str(DEMO),
        f"data.root={folder_dataset}",
        *TINY,
        "mine.lr=1e30",
        "mine.epochs=3",
    ]
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aepsl mine: error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert re.search(
        r"step 1: (loss is (nan|inf) at|weights are not finite after) iteration \d+", errors[0]
    )
    assert not (tmp_path / "run" / "mine" / "step1" / "classifier.pt").exists()


def test_step_line_when_nothing_was_mined():
    from aepsl.mine.stage import _step_line

    empty = {"precision": None, "recall": 0.0}
    record = {"step": 1, "train_loss": 0.69, "step_regions": empty, "union_regions": empty}
    assert _step_line(record) == "step 1: loss 0.6900, step P - R 0.000, union P - R 0.000"


def test_min_positives_raises_the_epochs_it_trains(folder_dataset, tmp_path, capsys):
    """The floor reaches the plan: the step trains and records the raised length."""
    from aepsl.config import DataConfig
    from aepsl.data.datasets import load_dataset
    from aepsl.mine.train import step_epochs

    config = _config(folder_dataset, "mine.steps=1", "mine.min_positives=30")
    train = load_dataset(DataConfig(root=str(folder_dataset))).split("train")
    epochs = step_epochs(config.mine, train)
    assert epochs > 2  # raised above mine.epochs=2
    run_mine(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "mine" / "step1" / "train.json").read_text())
    assert record["epochs"] == epochs
    assert record["iterations"] == epochs * (len(train) // 4)
    assert f"mine: {epochs} epochs ({record['iterations']} iterations) per step" in (
        capsys.readouterr().out
    )
