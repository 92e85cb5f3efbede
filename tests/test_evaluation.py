"""Confusion matrix and metrics, checked against torchmetrics as an independent implementation."""

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_jaccard_index

from aepsl.data.datasets import load_folder
from aepsl.evaluation import (
    average_precision,
    confusion_matrix,
    evaluate_folder,
    metrics_from_confusion,
    region_scores,
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
