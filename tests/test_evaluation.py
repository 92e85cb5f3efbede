"""Confusion matrix and metrics, checked against torchmetrics as an independent implementation."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_jaccard_index

from aepsl.data.datasets import load_folder
from aepsl.evaluation import (
    SEED_THRESHOLDS,
    average_precision,
    confusion_matrix,
    evaluate_folder,
    metrics_from_confusion,
    pseudo_label_confusions,
    pseudo_label_metrics,
    region_scores,
    seed_confusions,
    seed_miou_curve,
)
from aepsl.io import read_index_png, write_index_png


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    num = 5
    target = torch.randint(0, num, (4, 30, 30), generator=g)
    pred = torch.randint(0, num, (4, 30, 30), generator=g)
    target[:, :3] = 255
    matrix = confusion_matrix(pred, target, num)
    ours = metrics_from_confusion(matrix, [str(k) for k in range(num)])
    theirs = multiclass_jaccard_index(pred, target, num_classes=num, ignore_index=255, average=None)
    for k in range(num):
        assert ours["per_class"][str(k)]["IoU"] == pytest.approx(float(theirs[k]), abs=1e-6)
    assert ours["mIoU"] == pytest.approx(float(theirs.mean()), abs=1e-6)


def test_absent_classes_left_out_of_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    result = metrics_from_confusion(confusion_matrix(pred, target, 4), ["bg", "a", "b", "c"])
    assert result["per_class"]["b"]["IoU"] is None
    assert result["mIoU"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["per_class"]["a"]["precision"] == 1.0
    assert result["per_class"]["a"]["recall"] == 0.5


def test_prediction_ignore_policies():
    target = torch.tensor([0, 1, 1, 255])
    pred = torch.tensor([255, 1, 255, 1])
    excluded = confusion_matrix(pred, target, 2, "exclude")
    assert excluded.sum() == 1
    background = confusion_matrix(pred, target, 2, "background")
    assert background.tolist() == [[1, 0], [1, 1]]


def test_average_precision():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    ap = average_precision(scores, targets)
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert torch.isnan(ap[1])


def test_region_scores_count_conflicts_as_wrong():
    regions = np.array([[1, 255, 0, 2]], np.uint8)
    target = np.array([[1, 1, 1, 1]], np.uint8)
    assert region_scores(regions, target) == (1, 3, 4)


def test_evaluate_folder(folder_dataset, tmp_path):
    data = load_folder(folder_dataset)
    preds = tmp_path / "pred"
    for sample in data.split("val"):
        mask = read_index_png(sample.mask)
        write_index_png(preds / f"{sample.id}.png", np.where(mask == 255, 0, mask))
    result = evaluate_folder(preds, data.split("val"), data.classes)
    assert result["mIoU"] == pytest.approx(1.0)
    assert result["images"] == 2


# ------------------------------------------------ seed mIoU sweep and pseudo-label policies


def seed_example():
    """A 2x3 image with classes 1 and 3 present (of C = 3): CAMs, ground truth, by hand."""
    cam1 = [[0.9, 0.5, 0.1], [0.3, 0.0, 0.6]]
    cam3 = [[0.2, 0.7, 0.5], [0.3, 0.0, 0.6]]
    target = np.array([[1, 3, 0], [255, 0, 1]], np.uint8)
    return np.array([cam1, cam3]), [1, 3], target


def test_seed_confusions_by_hand():
    cams, present, target = seed_example()
    # Per pixel (best class, score, ground truth): (1, .9, 1) (3, .7, 3) (3, .5, 0)
    # (1, .3, 255: not scored) (1, .0, 0) (1, .6, 1: tie with class 3, the first listed wins).
    # Foreground iff score > t; the .5 pixel is background at t = .5 (tie goes to background).
    expected = [
        [  # t = .25: pred 0, 1, 2, 3 per ground-truth row
            [1, 0, 0, 1],
            [0, 2, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ],
        [  # t = .5
            [2, 0, 0, 0],
            [0, 2, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ],
        [  # t = .65: the .6 pixel of class 1 falls to background
            [2, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ],
    ]
    got = seed_confusions(cams, present, target, [0.25, 0.5, 0.65], num_classes=3)
    assert got.shape == (3, 4, 4)
    assert got.tolist() == expected

    curve = seed_miou_curve(got, [0.25, 0.5, 0.65])
    # t=.25: bg 1/2, class 1: 2/2, class 2 absent (left out), class 3: 1/2
    # t=.65: bg 2/3, class 1: 1/2, class 3: 1/1
    assert [t for t, _ in curve["curve"]] == [0.25, 0.5, 0.65]
    assert [m for _, m in curve["curve"]] == pytest.approx([2 / 3, 1.0, 13 / 18], abs=1e-6)
    assert curve["best_threshold"] == 0.5 and curve["best_mIoU"] == 1.0
    assert "oracle" in curve["protocol"]
    # the same rule as the rest of the module
    names = ["bg", "a", "b", "c"]
    assert metrics_from_confusion(torch.from_numpy(got[2]), names)["mIoU"] == pytest.approx(13 / 18)


def test_seed_confusions_without_classes_is_background():
    target = np.array([[0, 2], [255, 1]], np.uint8)
    got = seed_confusions(np.zeros((0, 2, 2)), [], target, SEED_THRESHOLDS, num_classes=2)
    assert got.shape == (len(SEED_THRESHOLDS), 3, 3)
    assert (got == np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0]])).all(axis=(1, 2)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_seed_confusions_match_stacked_argmax(seed):
    """Against the field's reference: pad the CAMs with t in front, argmax, map to classes,
    accumulated over images; values on a 0.05 grid so ties with thresholds really happen."""
    rng = np.random.default_rng(seed)
    thresholds = np.arange(1, 20) / 20
    num_classes = 5
    total = np.zeros((len(thresholds), 6, 6), np.int64)
    reference = torch.zeros(len(thresholds), 6, 6, dtype=torch.long)
    for _ in range(4):
        present = sorted(rng.choice(np.arange(1, 6), size=rng.integers(0, 4), replace=False))
        cams = rng.integers(0, 21, (len(present), 9, 7)) / 20
        target = rng.integers(0, 6, (9, 7)).astype(np.uint8)
        target[rng.random((9, 7)) < 0.2] = 255
        total += seed_confusions(cams, present, target, thresholds, num_classes)
        keys = np.array([0, *present])
        for i, t in enumerate(thresholds):
            stacked = np.concatenate([np.full((1, 9, 7), t), cams])
            pred = keys[stacked.argmax(0)]
            reference[i] += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 6)
    assert total.tolist() == reference.tolist()
    curve = seed_miou_curve(total, thresholds)
    for (t, miou), matrix in zip(curve["curve"], reference, strict=True):
        assert miou == pytest.approx(metrics_from_confusion(matrix, list("012345"))["mIoU"])
        assert t in thresholds


def test_seed_confusions_reject_bad_input():
    cams, present, target = seed_example()
    with pytest.raises(ValueError, match="strictly increasing"):
        seed_confusions(cams, present, target, [0.5, 0.25], 3)
    with pytest.raises(ValueError, match="cams must be"):
        seed_confusions(cams[:1], present, target, [0.5], 3)
    with pytest.raises(ValueError, match=r"in 1\.\.3"):
        seed_confusions(cams, [1, 4], target, [0.5], 3)
    with pytest.raises(ValueError, match="target labels"):
        seed_confusions(cams, present, np.full((2, 3), 7, np.uint8), [0.5], 3)


def test_pseudo_label_policies_side_by_side():
    target = np.array([0, 0, 1, 1, 2, 255], np.uint8)
    pred = np.array([0, 255, 1, 255, 1, 1], np.uint8)
    confusions = pseudo_label_confusions(pred, target, 3)
    # labelled pixels only: (0,0) (1,1) (2,1); unlabelled as background adds (0,0) and (1,0)
    assert confusions[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert confusions[1].tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 0]]
    result = pseudo_label_metrics(confusions, ["bg", "a", "b"])
    assert result["exclude"]["mIoU"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert result["background"]["mIoU"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert result["labelled_fraction_of_scored"] == pytest.approx(3 / 5)
    assert "predicted 255 excluded" in result["exclude"]["protocol"]
    assert "counted as background" in result["background"]["protocol"]


def test_pseudo_label_metrics_agree_with_evaluate_folder(folder_dataset, tmp_path):
    data = load_folder(folder_dataset)
    preds = tmp_path / "pred"
    total = torch.zeros(2, 3, 3, dtype=torch.long)
    for k, sample in enumerate(data.split("train")):
        mask = read_index_png(sample.mask)
        pred = np.where(mask == 255, 0, mask)
        pred[k % 3 :: 3] = 255  # some unlabelled rows
        write_index_png(preds / f"{sample.id}.png", pred)
        total += pseudo_label_confusions(pred, mask, 3)
    both = pseudo_label_metrics(total, ["background", *data.classes])
    for policy in ("exclude", "background"):
        single = evaluate_folder(preds, data.split("train"), data.classes, policy)
        assert both[policy]["mIoU"] == single["mIoU"]
        assert both[policy]["per_class"] == single["per_class"]
