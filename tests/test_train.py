"""`aepsl train` and `aepsl predict` end to end on a tiny dataset, with resume."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY_TRAIN, overrides

from aepsl import training
from aepsl.cli import main
from aepsl.config import load_config
from aepsl.io import read_index_png
from aepsl.models.saved import read_model_file
from aepsl.psl.stage import run_train

TINY = overrides(TINY_TRAIN, "train.iterations=6", "train.checkpoint_every=2")


def _with_pseudo_labels(root: Path, out: Path) -> Path:
    """A run folder whose pseudo labels are the ground truth with a few pixels ignored."""
    shutil.copytree(root / "masks", out / "labels")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import make_folder_dataset

    base = tmp_path_factory.mktemp("train")
    root = make_folder_dataset(base / "data", n=8)
    out = _with_pseudo_labels(root, base / "run")
    assert main(["train", DEMO, f"data.root={root}", *TINY, "--out", str(out)]) == 0
    return root, out


def test_train_outputs(trained):
    _root, out = trained
    state = read_model_file(out / "train" / "model.pt")[1]
    assert state["classifier.weight"].shape[0] == 3
    metrics = json.loads((out / "train" / "metrics.json").read_text())
    assert metrics["split"] == "val"
    assert 0 <= metrics["without_crf"]["mIoU"] <= 1
    assert 0 <= metrics["with_crf"]["mIoU"] <= 1
    for folder in ("predict", "predict_crf"):
        labels = read_index_png(out / folder / "img6.png")
        assert labels.shape == (32, 32) and labels.max() <= 2
        assert (out / folder / "overlay" / "img6.png").is_file()
    assert not (out / "train" / "checkpoint.pt").exists()
    assert (out / "train" / "tensorboard").is_dir()


def test_training_resumes_to_identical_weights(tmp_path, monkeypatch):
    from conftest import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", n=8)
    config = load_config(DEMO, [f"data.root={root}", *TINY])
    full = run_train(config, _with_pseudo_labels(root, tmp_path / "full"))
    save = training.save_checkpoint

    def killed_after_first_checkpoint(path, state):
        save(path, state)
        if path.name == "checkpoint.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_after_first_checkpoint)
    resumed_out = _with_pseudo_labels(root, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_train(config, resumed_out)
    monkeypatch.undo()
    resumed = run_train(config, resumed_out)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_train_without_pseudo_labels_is_clear(folder_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", DEMO, f"data.root={folder_dataset}", *TINY, "--out", str(out)])
    assert code == 2
    assert "run `aepsl labels`" in capsys.readouterr().err


def test_predict_images_folder_voc_layout(trained, tmp_path):
    root, out = trained
    target = tmp_path / "pred"
    code = main(
        [
            "predict",
            DEMO,
            *TINY,
            "--checkpoint",
            str(out / "train" / "model.pt"),
            "--images",
            str(root / "images"),
            "--format",
            "voc-test",
            "--out",
            str(target),
        ]
    )
    assert code == 0
    folder = target / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
    assert sorted(p.stem for p in folder.glob("*.png")) == [f"img{i}" for i in range(8)]


def test_predict_split_with_crf_and_options(trained, tmp_path):
    root, out = trained
    code = main(
        [
            "predict",
            DEMO,
            f"data.root={root}",
            *TINY,
            "predict.flip=true",
            "predict.scales=[1.0,0.75]",
            "predict.weight_by_classifier=true",
            "--checkpoint",
            str(out / "train" / "model.pt"),
            "--split",
            "val",
            "--crf",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    assert code == 0
    assert read_index_png(tmp_path / "p" / "img7.png").shape == (32, 32)


def test_crf_without_extra_gives_install_hint(trained, tmp_path, monkeypatch, capsys):
    root, out = trained
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    code = main(
        [
            "predict",
            DEMO,
            f"data.root={root}",
            *TINY,
            "crf.backend=pydensecrf",
            "--checkpoint",
            str(out / "train" / "model.pt"),
            "--split",
            "val",
            "--crf",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    assert code == 2
    assert "pip install 'aepsl[crf]'" in capsys.readouterr().err


def test_predict_refuses_foreign_checkpoint(trained, tmp_path, capsys):
    root, _ = trained
    bad = tmp_path / "bad.pt"
    torch.save({"something": np.int64(3)}, bad)  # needs pickle code: refused
    code = main(
        [
            "predict",
            DEMO,
            f"data.root={root}",
            "--checkpoint",
            str(bad),
            "--split",
            "val",
            "--out",
            str(tmp_path / "p"),
        ]
    )
    assert code == 2
    assert "refused: loading it would run Python code" in capsys.readouterr().err


def test_diverging_training_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys):
    from conftest import make_folder_dataset

    root = make_folder_dataset(tmp_path / "data", n=8)
    out = _with_pseudo_labels(root, tmp_path / "run")
    argv = ["train", DEMO, f"data.root={root}", *TINY, "train.checkpoint_every=1"]
    code = main([*argv, "train.lr=1e12", "train.iterations=50", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("aepsl train: error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "not finite" in errors[0] or "loss is" in errors[0]
    assert "iteration" in errors[0] and "checkpoint.pt" in errors[0]
    state = torch.load(out / "train" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "train" / "model.pt").exists()


def test_checkpoint_predicts_without_the_training_config(trained, tmp_path):
    """model.pt says how to build its network: no config, no model keys on the command line."""
    root, out = trained
    target = tmp_path / "bare"
    argv = ["predict", "--checkpoint", str(out / "train" / "model.pt"), "--images"]
    assert main([*argv, str(root / "images"), "--out", str(target), "precision=fp32"]) == 0
    assert sorted(p.stem for p in target.glob("*.png")) == [f"img{i}" for i in range(8)]


def test_checkpoint_and_disagreeing_config_is_one_line(trained, tmp_path, capsys):
    root, out = trained
    argv = ["predict", "model.backbone=vgg16", "--checkpoint", str(out / "train" / "model.pt")]
    assert main([*argv, "--images", str(root / "images"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "trained with model.backbone=tiny" in err
