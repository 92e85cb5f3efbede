"""A collapse is never silent: classes a stage never outputs, or one class on (nearly) every
pixel, are one-line warnings, recorded in metrics.json, shown in the report, and `aepsl run`
ends with a line saying whether the run looks healthy."""

import json

import numpy as np
from helpers import DEMO

from aepsl.cli import main
from aepsl.health import PSL_CAUSE, collapse_warnings, verdict

NAMES = ["cat", "dog", "cow"]


def test_missing_classes_are_named_with_a_cause():
    counts = np.array([500, 40, 0, 0])
    found = collapse_warnings(counts, {1, 2, 3}, NAMES, "labels", "pseudo labels")
    assert len(found) == 1
    assert "2 class(es) present in the image labels never appear in the pseudo labels" in found[0]
    assert "'dog', 'cow'" in found[0] and "labels.bg_threshold" in found[0]


def test_one_class_on_nearly_every_pixel_is_a_collapse():
    counts = np.array([990, 10, 0, 0])
    found = collapse_warnings(counts, {1}, NAMES, "train", "val predictions")
    assert found == [
        "train: 99.0% of the pixels of the val predictions are background: a collapse to one "
        "class; likely cause: too little training, or objects too small for the network's "
        "resolution (train.epochs or train.iterations, train.min_iterations, train.crop_size, "
        "model.seg_output_stride=8), or training crops that show a small part of large images "
        "(train.image_size), or pseudo labels without them (see the labels warnings)"
    ]
    assert collapse_warnings(counts, {1}, NAMES, "mine", "regions", check_dominant=False) == []
    with_psl = collapse_warnings(counts, {1}, NAMES, "train", "val predictions", also=PSL_CAUSE)
    assert with_psl == [f"{found[0]}; {PSL_CAUSE}"]


def test_healthy_output_has_no_warning():
    assert collapse_warnings(np.array([700, 100, 100, 100]), {1, 2, 3}, NAMES, "train", "x") == []
    assert verdict({"mine": [], "labels": []}) == (
        "health: no stage collapsed; the run looks healthy"
    )
    assert "2 warning(s) (labels, train)" in verdict({"labels": ["a"], "train": ["b"], "mine": []})


def test_a_run_that_cannot_learn_says_so(folder_dataset, tmp_path, capsys, recwarn):
    """Pseudo labels that are background everywhere (every pixel below a saliency of 0.99 is
    background, and background wins over mined pixels): the labels, then the network, collapse;
    each stage says so, metrics.json records it, the report shows it, the run is not healthy."""
    out = tmp_path / "run"
    argv = [
        "run",
        DEMO,
        f"data.root={folder_dataset}",
        "mine.epochs=1",
        "data.image_size=32",
        "mine.batch_size=4",
        "train.iterations=4",
        "train.crop_size=32",
        "train.batch_size=2",
        "precision=fp32",
        "crf.workers=1",
        "labels.bg_threshold=0.99",
        "labels.low_saliency=background",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    labels = json.loads((out / "labels" / "metrics.json").read_text())["warnings"]
    val = json.loads((out / "train" / "metrics.json").read_text())["warnings"]
    assert any("never appear in the pseudo labels" in line for line in labels)
    assert any("of the pixels of the val predictions are background" in line for line in val)
    assert all(line.endswith(PSL_CAUSE) for line in val)  # trained with PSL: it may be the cause
    warned = [str(w.message) for w in recwarn]  # printed as `aepsl run: warning: ...` lines
    for line in [*labels, *val]:
        assert line in warned and "\n" not in line
    assert "the run does NOT look healthy" in captured.out.splitlines()[-1]
    page = (out / "report.html").read_text()
    assert '<h2 id="health">Warnings</h2>' in page and "never appear in the pseudo labels" in page

    # `aepsl predict` with that network: the split's classes never predicted, background nearly
    # everywhere; on a folder of images (no image labels, no names) only the latter
    model, common = (
        str(out / "train" / "model.pt"),
        [f"data.root={folder_dataset}", "crf.workers=1"],
    )
    for source, pred in (
        (["--split", "val"], "split"),
        (["--images", str(folder_dataset / "images")], "folder"),
    ):
        argv = ["predict", DEMO, "--checkpoint", model, *source, "--out", str(tmp_path / pred)]
        assert main([*argv, *common]) == 0
        found = json.loads((tmp_path / pred / "health.json").read_text())["warnings"]
        assert [line.split(":")[0] for line in found] == ["predict"] * len(found)
        assert any(
            "of the pixels of the predictions are background: a collapse" in line for line in found
        )
        never = any("never appear in the predictions" in line for line in found)
        assert never == (pred == "split")
        assert all(line in [str(w.message) for w in recwarn] for line in found)
