"""PSL training crops: the whole image is rescaled before cropping (zooming in never clips it),
padding is marked in a valid mask, and both cross-entropies ignore padded pixels, also when the
batch is shared by several processes."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from aepsl.data.datasets import Sample
from aepsl.io import write_index_png
from aepsl.labelmap import IGNORE
from aepsl.psl import stage as psl_stage
from aepsl.psl.data import MEAN_RGB, PseudoLabelled, crop_with_padding, draw_crop, rescale
from aepsl.psl.loss import psl_loss


def _sample(tmp_path, height: int = 20, width: int = 30) -> tuple[Sample, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), np.uint8)
    label[5:12, 8:20] = 1
    label[0] = IGNORE
    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.png")
    write_index_png(tmp_path / "labels" / "a.png", label)
    return Sample("a", tmp_path / "images" / "a.png", (1,)), image


# ------------------------------------------------------------------ crops


def test_the_rescaled_image_keeps_every_pixel_when_zooming_in():
    generator = torch.Generator().manual_seed(0)
    crop = draw_crop(generator, 20, 30, 16, (1.3, 1.3))
    assert (crop.height, crop.width) == (round(1.3 * 20), round(1.3 * 30)) == (26, 39)
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    label = torch.randint(0, 3, (20, 30), dtype=torch.uint8)
    big_image, big_label = rescale(image, label, crop.height, crop.width)
    assert big_image.shape == (3, 26, 39) and big_label.shape == (26, 39)
    assert set(big_label.unique().tolist()) <= set(label.unique().tolist())  # nearest
    # the window lies inside the enlarged image, anywhere: first and last rows/columns reachable
    tops = set()
    for seed in range(200):
        drawn = draw_crop(torch.Generator().manual_seed(seed), 20, 30, 16, (1.3, 1.3))
        assert 0 <= drawn.top <= 26 - 16 and 0 <= drawn.left <= 39 - 16
        tops.add(drawn.top)
    assert tops == set(range(26 - 16 + 1))


def test_a_crop_larger_than_the_rescaled_image_holds_all_of_it_and_marks_padding():
    image = torch.randint(0, 256, (3, 26, 39), dtype=torch.uint8)
    label = torch.randint(0, 3, (26, 39), dtype=torch.uint8)
    out_image, out_label, valid = crop_with_padding(image, label, 48, top=-5, left=-2)
    assert valid.sum() == 26 * 39
    assert torch.equal(out_image[:, 5:31, 2:41], image)
    assert torch.equal(out_label[5:31, 2:41], label)
    assert valid[5:31, 2:41].all() and not valid[:5].any() and not valid[:, 41:].any()
    assert torch.all(out_label[~valid] == IGNORE)
    padded = out_image.permute(1, 2, 0)[~valid]
    assert torch.all(padded == torch.tensor(MEAN_RGB, dtype=torch.uint8))
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # drawn positions of a smaller image always hold all of it
        drawn = draw_crop(generator, 26, 39, 48, (1.0, 1.0))
        assert -(48 - 26) <= drawn.top <= 0 and -(48 - 39) <= drawn.left <= 0


def test_dataset_returns_the_valid_mask_and_replays_its_crops(tmp_path):
    sample, _ = _sample(tmp_path)
    dataset = PseudoLabelled([sample], 2, tmp_path / "labels", 32, (1.3, 1.3), seed=0)
    crop, label, target, valid = dataset[0]
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32 and crop.max() <= 1
    assert label.shape == valid.shape == (32, 32) and valid.dtype == torch.bool
    assert target.tolist() == [1.0, 0.0]
    assert 0 < valid.sum() < 32 * 32  # 26 rows x 39 columns: rows padded, columns cut
    assert valid.sum() == 26 * 32
    assert torch.all(label[~valid] == IGNORE)
    again = dataset[0]
    assert all(torch.equal(a, b) for a, b in zip((crop, label, target, valid), again, strict=True))
    positions = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        positions.add(tuple(dataset[0][3].nonzero()[0].tolist()))
    assert len(positions) > 1  # each epoch draws anew


# ------------------------------------------------------------------ the loss


def test_padding_is_excluded_from_both_cross_entropies():
    """Two pixels: A real with uniform scores (cross-entropy ln 3 whatever the target), B
    padding with scores strongly for background. S labels both 1; S_hat is background at both.
    Counted, B would add about 10 to CE(f, S) and about 0 to CE(f, S_hat)."""
    scores = torch.zeros(1, 3, 1, 2)
    scores[0, 0, 0, 1] = 10.0
    pseudo = torch.ones(1, 1, 2, dtype=torch.long)
    valid = torch.tensor([[[True, False]]])
    labels = torch.tensor([[1.0, 0.0]])
    logits = torch.zeros(1, 2)  # nu = 0.5: (0.5 - 1)^2 + 0.5^2 = 0.5
    total, parts = psl_loss(scores, logits, pseudo, labels, valid=valid)
    assert parts["seg"] == pytest.approx(math.log(3))
    assert parts["psl"] == pytest.approx(math.log(3))
    assert parts["cls"] == pytest.approx(0.5)
    assert total.item() == pytest.approx(0.5 + 2 * math.log(3))
    _, counted = psl_loss(scores, logits, pseudo, labels)  # without the mask: B counts
    assert counted["seg"] == pytest.approx((math.log(3) + 10 + math.log1p(2 * math.exp(-10))) / 2)
    assert counted["psl"] == pytest.approx(math.log(3) / 2, rel=1e-3)


def test_two_processes_share_the_padded_batch_as_one(monkeypatch):
    """global_psl_loss on two halves of a batch whose crops are padded differently: the mean
    of the ranks' losses (what DDP's gradient average follows) is the one-process loss."""
    torch.manual_seed(0)
    scores = torch.randn(4, 3, 4, 4)
    logits = torch.randn(4, 2)
    pseudo = torch.randint(0, 3, (4, 16, 16))
    pseudo[pseudo == 2] = IGNORE
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    valid = torch.ones(4, 16, 16, dtype=torch.bool)
    valid[0, :, 10:] = False
    valid[1, 12:] = False
    valid[3, :3, :3] = False  # rank 1 pads far less than rank 0
    one, _ = psl_loss(scores, logits, pseudo, labels, valid=valid)

    barrier, slots = threading.Barrier(2), {}
    local = threading.local()

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        slots[local.rank] = tensor.detach().clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total

    monkeypatch.setattr(psl_stage, "world_size", lambda: 2)
    monkeypatch.setattr(psl_stage, "all_reduce_sum", all_reduce_sum)
    results = {}

    def rank(r: int) -> None:
        local.rank = r
        part = slice(2 * r, 2 * r + 2)
        results[r] = psl_stage.global_psl_loss(
            scores[part], logits[part], pseudo[part], labels[part], True, valid[part]
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mean = (results[0][0] + results[1][0]) / 2
    assert mean.item() == pytest.approx(one.item(), rel=1e-5)
    assert results[0][1]["total"] == pytest.approx(one.item(), rel=1e-5)
