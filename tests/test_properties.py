"""Property tests of the pure cores: `aepsl.mine.cam` (CAMs, thresholds, label maps, union,
erasing) and `aepsl.labels.fusion` (pseudo labels), against the rules their docstrings and
ALGORITHM.md state. Random small label maps and CAMs; hypothesis shrinks any counterexample.

Label-map encoding (cam.py): 0 = nothing mined, k = class k, 255 = conflict (two or more
classes at that pixel). Pseudo labels (fusion.py): 0 background, k class, 255 ignore.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aepsl.labelmap import CONFLICT
from aepsl.labels.fusion import background_from_cams, background_from_saliency, fuse_pseudo_label
from aepsl.mine.cam import (
    fill_erased,
    max_normalise,
    normalise_cams,
    union_label_maps,
    upsample_relu,
)
from aepsl.regions import cams_to_regions, regions_to_label_map, threshold_regions

SETTINGS = settings(max_examples=80, deadline=None)
EPS = 1e-5  # max_normalise's default: peaks below it are not scaled up to 1

side = st.integers(1, 6)
# CAM values with many exact ties and zeros, as real upsampled, normalised CAMs have.
unit = st.one_of(st.just(0.0), st.sampled_from([0.25, 0.5, 0.8, 1.0]), st.floats(0, 1, width=32))
# Raw activations for CAMs: zero, or far above max_normalise's eps (see EPS).
activation = st.one_of(st.just(0.0), st.sampled_from([0.5, 2.0]), st.floats(0.125, 10, width=32))
fraction = st.floats(0.01, 0.99)
modes = st.sampled_from(["relative", "quantile"])


@st.composite
def class_ids(draw, k: int) -> list[int]:
    return draw(st.lists(st.integers(1, 254), min_size=k, max_size=k, unique=True))


@st.composite
def cams_and_ids(draw, min_k: int = 0, max_k: int = 4):
    """Normalised CAMs (K, H, W) in [0, 1] of an image's K classes, and the class ids."""
    k, h, w = draw(st.integers(min_k, max_k)), draw(side), draw(side)
    raw = torch.from_numpy(draw(arrays(np.float32, (k, h, w), elements=activation)))
    return max_normalise(raw), draw(class_ids(k))


@st.composite
def label_maps(draw, shape: tuple[int, int], ids: list[int]) -> torch.Tensor:
    values = st.sampled_from([0, CONFLICT, *ids])
    return torch.from_numpy(draw(arrays(np.uint8, shape, elements=values)))


@st.composite
def steps_of_label_maps(draw, min_steps: int = 1, max_steps: int = 4):
    """Label maps of K erasing steps of one image: its classes, 0 and conflicts."""
    shape = (draw(side), draw(side))
    ids = draw(class_ids(draw(st.integers(1, 4))))
    count = draw(st.integers(min_steps, max_steps))
    return [draw(label_maps(shape, ids)) for _ in range(count)], ids


def fold_union(maps: list[torch.Tensor]) -> torch.Tensor:
    union = maps[0]
    for step in maps[1:]:
        union = union_label_maps(union, step)
    return union


# ------------------------------------------------------------------ CAM normalisation


@SETTINGS
@given(arrays(np.float32, st.tuples(st.integers(1, 3), side, side), elements=unit))
def test_max_normalise_is_in_unit_range_with_peak_one(maps):
    out = max_normalise(torch.from_numpy(maps)).numpy()
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    for raw, norm in zip(maps, out, strict=True):
        if raw.max() == 0:
            assert (norm == 0).all()  # an all-zero map stays zero
        elif raw.max() >= EPS:
            assert norm.max() == 1.0
            assert np.array_equal(norm == 1.0, raw == raw.max())  # only the peak reaches 1


@SETTINGS
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
        elements=st.floats(-4, 4, width=32),
    ),
    st.tuples(side, side),
)
def test_normalise_cams_relu_upsampled_and_in_unit_range(raw, size):
    cams = normalise_cams(torch.from_numpy(raw), size)
    assert cams.shape == (*raw.shape[:2], *size)
    assert cams.min() >= 0 and cams.max() <= 1
    peaks = upsample_relu(torch.from_numpy(raw), size).flatten(-2).amax(-1)
    got = cams.flatten(-2).amax(-1)
    assert torch.equal(got[peaks >= EPS], torch.ones_like(got[peaks >= EPS]))
    assert torch.all(got[peaks == 0] == 0)
    negative = (torch.from_numpy(raw) <= 0).flatten(-2).all(-1)
    assert torch.all(cams.flatten(-2)[negative] == 0)  # no positive evidence, no CAM


# ------------------------------------------------------------------ thresholds and label maps


@SETTINGS
@given(cams_and_ids(), modes, fraction)
def test_label_map_uses_image_classes_and_marks_conflicts(cams_ids, mode, threshold):
    cams, ids = cams_ids
    regions = threshold_regions(cams, mode, threshold)
    labels = regions_to_label_map(regions, ids)
    assert labels.dtype == torch.uint8 and labels.shape == cams.shape[1:]
    assert set(labels.unique().tolist()) <= {0, CONFLICT, *ids}
    count = regions.sum(0)
    assert torch.equal(labels == CONFLICT, count >= 2)  # 255 exactly where 2+ classes pass
    assert torch.equal(labels == 0, count == 0)
    for k, class_id in enumerate(ids):
        assert torch.equal(labels == class_id, regions[k] & (count == 1))


@SETTINGS
@given(cams_and_ids(min_k=1), modes, fraction)
def test_only_positive_activation_is_mined_and_a_peak_always_is(cams_ids, mode, threshold):
    cams, _ = cams_ids
    regions = threshold_regions(cams, mode, threshold)
    assert not regions[cams == 0].any()
    if mode == "relative":
        assert torch.equal(regions, (cams >= threshold) & (cams > 0))
    for cam, region in zip(cams, regions, strict=True):
        if cam.max() > 0:  # the peak is 1 after normalisation: >= any relative threshold,
            assert region[cam == cam.max()].all()  # and >= any quantile cut


@SETTINGS
@given(cams_and_ids(min_k=1), fraction, fraction)
def test_relative_region_shrinks_as_threshold_rises(cams_ids, a, b):
    cams, _ = cams_ids
    low, high = sorted((a, b))
    strict = threshold_regions(cams, "relative", high)
    loose = threshold_regions(cams, "relative", low)
    assert not (strict & ~loose).any()


@SETTINGS
@given(cams_and_ids(min_k=1), fraction, fraction)
def test_quantile_region_shrinks_as_the_cut_rises(cams_ids, a, b):
    """quantile mode's `threshold` is the fraction erased: a smaller fraction is a higher cut."""
    cams, _ = cams_ids
    small, large = sorted((a, b))
    strict = threshold_regions(cams, "quantile", small)
    loose = threshold_regions(cams, "quantile", large)
    assert not (strict & ~loose).any()


@SETTINGS
@given(st.integers(2, 40), fraction)
def test_quantile_takes_the_top_fraction_of_distinct_values(n, threshold):
    cams = torch.linspace(1.0 / n, 1.0, n).reshape(1, 1, n)
    mined = int(threshold_regions(cams, "quantile", threshold).sum())
    assert abs(mined - threshold * n) <= 1


# ------------------------------------------------------------------ union over steps


@SETTINGS
@given(steps_of_label_maps(min_steps=2, max_steps=2))
def test_union_of_two_maps_follows_the_rule(maps_ids):
    (a, b), ids = maps_ids
    union = union_label_maps(a, b)
    assert union.dtype == torch.uint8
    assert set(union.unique().tolist()) <= {0, CONFLICT, *ids}
    clash = (a == CONFLICT) | (b == CONFLICT) | ((a != 0) & (b != 0) & (a != b))
    assert torch.equal(union == CONFLICT, clash)
    assert torch.equal(union == 0, (a == 0) & (b == 0))
    single = (union != 0) & (union != CONFLICT)  # each mined pixel was mined with that class
    assert torch.all(((a == union) | (b == union))[single])  # in some step
    assert torch.all((((a == union) | (a == 0)) & ((b == union) | (b == 0)))[single])  # only
    assert torch.equal(union, union_label_maps(b, a))
    assert torch.equal(union_label_maps(a, a), a)


@SETTINGS
@given(steps_of_label_maps())
def test_union_over_steps_is_the_set_rule_and_never_unmines(maps_ids):
    maps, _ = maps_ids
    union = fold_union(maps)
    stacked = torch.stack([m.long() for m in maps])
    for y, x in np.ndindex(*union.shape):
        seen = set(stacked[:, y, x].tolist()) - {0}
        expected = 0 if not seen else CONFLICT if CONFLICT in seen or len(seen) > 1 else seen.pop()
        assert int(union[y, x]) == expected
    for k in range(1, len(maps)):
        before, after = fold_union(maps[:k]), fold_union(maps[: k + 1])
        assert not ((before != 0) & (after == 0)).any()  # adding a step never unmines
        assert not ((before == CONFLICT) & (after != CONFLICT)).any()  # conflicts stay


@SETTINGS
@given(steps_of_label_maps(min_steps=3, max_steps=3))
def test_union_is_associative(maps_ids):
    (a, b, c), _ = maps_ids
    left = union_label_maps(union_label_maps(a, b), c)
    assert torch.equal(left, union_label_maps(a, union_label_maps(b, c)))


# ------------------------------------------------------------------ erasing


@SETTINGS
@given(
    st.booleans(),
    st.sampled_from([torch.uint8, torch.float32]),
    st.tuples(st.integers(1, 2), side, side),
    st.data(),
)
def test_fill_erased_changes_exactly_the_erased_pixels(batched, dtype, shape, data):
    n, h, w = shape
    np_dtype = np.uint8 if dtype == torch.uint8 else np.float32
    values = st.integers(0, 255) if dtype == torch.uint8 else st.floats(-3, 3, width=32)
    images = torch.from_numpy(data.draw(arrays(np_dtype, (n, 3, h, w), elements=values)))
    erase = torch.from_numpy(data.draw(arrays(np.bool_, (n, h, w))))
    fill = torch.from_numpy(data.draw(arrays(np_dtype, (3,), elements=values)))
    if not batched:
        images, erase = images[0], erase[0]
    out = fill_erased(images, erase, fill)
    assert out.shape == images.shape and out.dtype == images.dtype
    keep = ~erase.unsqueeze(-3).expand_as(images)
    assert torch.equal(out[keep], images[keep])
    inside = out.movedim(-3, -1)[erase]  # (pixels, 3)
    assert torch.equal(inside, fill.expand_as(inside))


# ------------------------------------------------------------------ pseudo-label fusion


@st.composite
def regions_and_background(draw):
    shape = (draw(side), draw(side))
    ids = draw(class_ids(draw(st.integers(0, 4))))
    regions = draw(label_maps(shape, ids)).numpy()
    background = draw(arrays(np.bool_, shape))
    return regions, background, ids


policies = st.sampled_from(["mined", "background"])


@SETTINGS
@given(regions_and_background(), policies)
def test_fusion_follows_the_documented_rules(case, policy):
    regions, background, _ = case
    labels = fuse_pseudo_label(regions, background, policy)
    assert labels.dtype == np.uint8 and labels.shape == regions.shape
    present = set(np.unique(regions).tolist()) - {0, CONFLICT}
    assert set(np.unique(labels).tolist()) <= {0, 255} | present
    mined = (regions != 0) & (regions != CONFLICT)
    unmined = regions == 0
    conflict = regions == CONFLICT
    bg_wins = background if policy == "background" else np.zeros_like(background)
    # A pixel mined for one class gets it (unless the background policy takes it).
    assert np.array_equal(labels[mined & ~bg_wins], regions[mined & ~bg_wins])
    # Background only where the saliency source says so.
    assert not (labels == 0)[~background].any()
    # An unmined pixel that is background is 0; one that is not (middling / high saliency) is 255.
    assert (labels[unmined & background] == 0).all()
    assert (labels[unmined & ~background] == 255).all()
    # A conflict is ignored; only the background policy may turn it into background.
    assert (labels[conflict & ~bg_wins] == 255).all()
    assert (labels[conflict & bg_wins] == 0).all()
    assert (labels[mined & bg_wins] == 0).all()


@SETTINGS
@given(regions_and_background())
def test_default_policy_keeps_every_mined_class_whatever_the_saliency(case):
    regions, background, _ = case
    labels = fuse_pseudo_label(regions, background)
    assert np.array_equal(labels, fuse_pseudo_label(regions, background, "mined"))
    mined = (regions != 0) & (regions != CONFLICT)
    assert np.array_equal(labels[mined], regions[mined])
    assert (labels[regions == CONFLICT] == 255).all()


@SETTINGS
@given(st.data(), policies, fraction, fraction)
def test_rising_bg_threshold_never_shrinks_background(data, policy, a, b):
    shape = (data.draw(side), data.draw(side))
    ids = data.draw(class_ids(data.draw(st.integers(0, 3))))
    regions = data.draw(label_maps(shape, ids)).numpy()
    saliency = data.draw(arrays(np.float32, shape, elements=unit))
    low, high = sorted((a, b))
    loose = fuse_pseudo_label(regions, background_from_saliency(saliency, low), policy)
    strict = fuse_pseudo_label(regions, background_from_saliency(saliency, high), policy)
    assert not ((loose == 0) & (strict != 0)).any()
    classes = (loose != 0) & (loose != 255)  # a higher threshold never adds a class pixel
    assert not (((strict != 0) & (strict != 255)) & ~classes).any()


@SETTINGS
@given(st.data(), fraction, fraction)
def test_background_from_saliency_and_cams(data, a, b):
    shape = (data.draw(side), data.draw(side))
    saliency = data.draw(arrays(np.float32, shape, elements=unit))
    cams = data.draw(arrays(np.float32, (data.draw(st.integers(0, 3)), *shape), elements=unit))
    low, high = sorted((a, b))
    assert np.array_equal(background_from_saliency(saliency, low), saliency < low)
    bg_low, bg_high = background_from_cams(cams, low), background_from_cams(cams, high)
    assert bg_low.shape == shape and not (bg_low & ~bg_high).any()
    if len(cams):  # background where every present class's CAM is below the threshold
        assert np.array_equal(bg_low, (cams < low).all(axis=0))
    else:
        assert bg_low.all()


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), side, side, modes, fraction, st.data())
def test_pipeline_pseudo_labels_use_only_the_image_classes(k, steps, h, w, mode, threshold, data):
    """Threshold K steps' CAMs, take the union, fuse with saliency: no foreign class appears."""
    ids = data.draw(class_ids(k))
    maps = []
    for _ in range(steps):
        raw = data.draw(arrays(np.float32, (k, h, w), elements=activation))
        cams = max_normalise(torch.from_numpy(raw))
        maps.append(cams_to_regions(cams, ids, mode, threshold))
    union = fold_union(maps).numpy()
    saliency = data.draw(arrays(np.float32, union.shape, elements=unit))
    labels = fuse_pseudo_label(union, background_from_saliency(saliency, threshold))
    assert set(np.unique(labels).tolist()) <= {0, 255, *ids}
