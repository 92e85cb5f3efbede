"""The erasing path itself (issue 26): each step's classifier starts from the same weights and
trains on images whose earlier steps' regions, and only those, are the mean pixel; the union is
built from the steps used."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_folder_dataset
from helpers import DEMO, TINY_MINE, overrides

import aepsl.mine.train as mine_train
from aepsl.config import DataConfig, load_config
from aepsl.data.datasets import load_dataset, load_image
from aepsl.io import read_index_png, write_index_png
from aepsl.mine.data import ErasedImages
from aepsl.mine.stage import run_mine


def test_erased_pixels_are_the_mean_pixel_exactly_where_earlier_steps_mined(tmp_path):
    root = make_folder_dataset(tmp_path / "data", n=4, size=32)
    sample = load_dataset(DataConfig(root=str(root))).split("train")[0]
    rng = np.random.default_rng(0)
    folders = []
    for step in (1, 2):
        folder = tmp_path / f"step{step}"
        regions = np.where(rng.random((32, 32)) < 0.2, rng.choice([1, 2, 255]), 0)
        write_index_png(folder / f"{sample.id}.png", regions.astype(np.uint8))
        folders.append(folder)
    fill = [10.2, 200.7, 99.5]
    image, _, _ = ErasedImages([sample], 2, folders, fill)[0]
    erased = np.any([read_index_png(f / f"{sample.id}.png") != 0 for f in folders], axis=0)
    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.all(pixels[erased] == np.round(fill).astype(np.uint8))
    assert np.array_equal(pixels[~erased], load_image(sample)[~erased])
    assert erased.any() and (~erased).any()


def test_each_step_starts_from_the_same_weights_on_the_erased_images(tmp_path, monkeypatch):
    root = make_folder_dataset(tmp_path / "data", n=8, size=32)
    config = load_config(DEMO, [f"data.root={root}", *overrides(TINY_MINE, "mine.steps=3")])
    seen = []
    real_fit = mine_train.fit

    def recording_fit(trainer, dataset, plan):
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        seen.append((state, list(dataset.region_dirs)))
        return real_fit(trainer, dataset, plan)

    monkeypatch.setattr(mine_train, "fit", recording_fit)
    out = tmp_path / "run"
    metrics = run_mine(config, out)
    assert len(seen) == 3
    first = seen[0][0]
    for state, _ in seen[1:]:
        assert state.keys() == first.keys()
        assert all(torch.equal(state[k], first[k]) for k in first)
    mine = out / "mine"
    assert [dirs for _, dirs in seen] == [
        [],
        [mine / "step1" / "regions"],
        [mine / "step1" / "regions", mine / "step2" / "regions"],
    ]
    assert metrics["steps_used"] == [1, 2, 3]


def test_a_stopped_step_is_left_out_of_the_union(tmp_path, monkeypatch):
    """mine.auto_stop: step 2's loss (made 10x step 1's here) stops the mining; the union is
    step 1's regions alone, and no regions of step 2 are written."""
    import aepsl.mine.stage as mine_stage

    real_train_step = mine_stage.train_step

    def harder(ctx, step):
        model, loss = real_train_step(ctx, step)
        return model, loss * 10 if step.number == 2 else loss

    monkeypatch.setattr(mine_stage, "train_step", harder)
    root = make_folder_dataset(tmp_path / "data", n=8, size=32)
    extra = ["mine.steps=3", "mine.auto_stop=true", "mine.auto_stop_factor=2"]
    config = load_config(DEMO, [f"data.root={root}", *overrides(TINY_MINE, *extra)])
    out = tmp_path / "run"
    metrics = run_mine(config, out)
    assert metrics["steps_used"] == [1]
    assert [s["step"] for s in metrics["steps"]] == [1, 2]
    assert "stopped" in metrics["steps"][1]
    assert not any((out / "mine" / "step2" / "regions").glob("*.png"))
    for path in (out / "mine" / "regions").glob("*.png"):
        step1 = read_index_png(out / "mine" / "step1" / "regions" / path.name)
        assert np.array_equal(read_index_png(path), step1)
