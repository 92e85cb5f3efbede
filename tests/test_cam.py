"""The erasing core: CAM normalisation, thresholds, conflicts, union, mean fill."""

import pytest
import torch

from aepsl.labelmap import CONFLICT
from aepsl.mine.cam import (
    fill_erased,
    max_normalise,
    normalise_cams,
    union_label_maps,
)
from aepsl.regions import cams_to_regions, regions_to_label_map, threshold_regions


def test_normalise_cams_relu_upsample_and_max_one():
    maps = torch.tensor([[[[-1.0, 2.0], [0.5, 4.0]], [[-3.0, -1.0], [-2.0, -5.0]]]])
    cams = normalise_cams(maps, (8, 8))
    assert cams.shape == (1, 2, 8, 8)
    assert cams[0, 0].max() == pytest.approx(1.0)
    assert cams[0, 0].min() >= 0
    assert torch.all(cams[0, 1] == 0)  # no positive evidence: no CAM, not a divide-by-zero


def test_max_normalise_keeps_zero_maps_finite():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1, 2, 2] = 7.0
    out = max_normalise(maps)
    assert torch.isfinite(out).all()
    assert out[0, 1, 2, 2] == pytest.approx(1.0)
    assert out.sum() == pytest.approx(1.0)


def test_relative_threshold():
    cams = torch.tensor([[[0.0, 0.2, 0.5], [0.79, 0.8, 1.0]]])
    regions = threshold_regions(cams, "relative", 0.8)
    assert regions.tolist() == [[[False, False, False], [False, True, True]]]


def test_quantile_threshold_takes_top_fraction():
    cams = torch.linspace(0.01, 1.0, 100).reshape(1, 10, 10)
    regions = threshold_regions(cams, "quantile", 0.2)
    assert int(regions.sum()) == 20
    assert regions.flatten()[-20:].all()


def test_quantile_never_mines_zero_activation():
    cams = torch.zeros(1, 10, 10)
    cams[0, 0, :3] = 1.0
    assert int(threshold_regions(cams, "quantile", 0.5).sum()) == 3


def test_label_map_marks_conflicts():
    regions = torch.zeros(2, 2, 3, dtype=torch.bool)
    regions[0, 0, :2] = True  # class 3
    regions[1, 0, 1:] = True  # class 7
    labels = regions_to_label_map(regions, [3, 7])
    assert labels.tolist() == [[3, CONFLICT, 7], [0, 0, 0]]
    assert labels.dtype == torch.uint8


def test_label_map_with_no_classes():
    labels = regions_to_label_map(torch.zeros(0, 2, 2, dtype=torch.bool), [])
    assert labels.tolist() == [[0, 0], [0, 0]]


def test_union_of_label_maps():
    a = torch.tensor([[1, 0, 1, CONFLICT, 0]], dtype=torch.uint8)
    b = torch.tensor([[0, 2, 2, 0, 0]], dtype=torch.uint8)
    assert union_label_maps(a, b).tolist() == [[1, 2, CONFLICT, CONFLICT, 0]]
    assert union_label_maps(a, a).tolist() == a.tolist()


def test_fill_erased_uses_mean_colour():
    images = torch.rand(2, 3, 4, 4)
    erase = torch.zeros(2, 4, 4, dtype=torch.bool)
    erase[1, 2:, :] = True
    fill = torch.tensor([0.1, 0.2, 0.3])
    out = fill_erased(images, erase, fill)
    assert torch.equal(out[0], images[0])
    assert torch.allclose(out[1, :, 2:, :], fill.view(3, 1, 1).expand(3, 2, 4))
    assert torch.equal(out[1, :, :2], images[1, :, :2])
    uint8 = fill_erased(
        torch.zeros(3, 2, 2, dtype=torch.uint8),
        erase[1, 2:, :2],
        torch.tensor([9, 8, 7], dtype=torch.uint8),
    )
    assert uint8[:, 0, 0].tolist() == [9, 8, 7]


def test_cams_to_regions_thresholds_then_labels():
    cams = torch.tensor([[[0.9, 0.2], [0.85, 0.0]], [[0.95, 0.1], [0.0, 1.0]]])
    labels = cams_to_regions(cams, [2, 5], "relative", 0.8)
    assert labels.tolist() == [[CONFLICT, 0], [2, 5]]
    regions = threshold_regions(cams, "relative", 0.8)
    assert torch.equal(labels, regions_to_label_map(regions, [2, 5]))
