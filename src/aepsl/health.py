"""Is a stage's output healthy? A collapse is said in words, never printed as a score.

After `mine`, `labels`, `train` (its val predictions) and `predict`, the label maps a stage
wrote are counted per class. Two faults are reported, one line each, with the most likely
cause: a class present in the split's image labels that the stage never outputs, and one class
taking (nearly) every pixel. The lines go to stderr as warnings, into the stage's
metrics.json (predict's: OUT/health.json) under "warnings", and to the top of the report.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from aepsl.data.datasets import Sample
from aepsl.io import read_index_png

DOMINANT_SHARE = 0.95  # one class on this share of the pixels is a collapse, not a scene
ONE_CLASS = "a collapse to one class"  # the words of that warning, which benchmarks look for

CAUSES = {
    "mine": "the classifiers never localised them: too few images of the class, or objects too "
    "small for the CAM resolution (try more mine.epochs or mine.min_positives, "
    "mine.cam_scales, model.cam_output_stride=8)",
    "labels": "nothing was mined for them, or the background rule took their pixels "
    "(labels.bg_threshold, labels.low_saliency)",
    "predictions": "too little training, or objects too small for the network's resolution "
    "(train.epochs or train.iterations, train.min_iterations, train.crop_size, "
    "model.seg_output_stride=8), or training crops that show a small part of large images "
    "(train.image_size), or pseudo labels without them (see the labels warnings)",
    "predict": "a network that collapsed in training (see its run's health line), or images "
    "unlike those it was trained on",
}
# added to the predictions' cause when the network was trained with PSL: where it does not fit
# the pseudo labels, its own argmax (the prohibitive mask) pulls object pixels to background
PSL_CAUSE = (
    "or, with PSL, the prohibitive mask of a network that does not fit its pseudo labels "
    "teaching background (train.psl=false trains on the pseudo labels alone; `aepsl run` "
    "with it re-runs the train stage only; docs/robustness.md)"
)


def label_counts(folder: Path, ids: Iterable[str], num_labels: int) -> np.ndarray:
    """Pixels per label 0..num_labels-1 over `folder/<id>.png` (ignore / conflict, 255, not
    counted)."""
    counts = np.zeros(num_labels, np.int64)
    for image_id in ids:
        labels = read_index_png(folder / f"{image_id}.png")
        counts += np.bincount(labels[labels < num_labels].ravel(), minlength=num_labels)[
            :num_labels
        ]
    return counts


def collapse_warnings(
    counts: np.ndarray,
    present: Iterable[int],
    names: list[str],
    stage: str,
    what: str,
    check_dominant: bool = True,
    also: str = "",
) -> list[str]:
    """The warnings for per-label pixel `counts` (index 0 = background, k = names[k - 1]) of a
    stage's output, given the classes `present` in the image labels it was made for; `also`
    adds a cause to the stage's."""
    cause = CAUSES[_cause(stage)] + (f"; {also}" if also else "")
    found: list[str] = []
    missing = sorted(k for k in set(present) if counts[k] == 0)
    if missing:
        listed = ", ".join(f"'{names[k - 1]}'" for k in missing)
        found.append(
            f"{stage}: {len(missing)} class(es) present in the image labels never appear in "
            f"the {what}: {listed}; likely cause: {cause}"
        )
    total = int(counts.sum())
    if check_dominant and total:
        top = int(np.argmax(counts))
        share = counts[top] / total
        if share >= DOMINANT_SHARE:
            name = "background" if top == 0 else f"'{names[top - 1]}'"
            found.append(
                f"{stage}: {share:.1%} of the pixels of the {what} are {name}: {ONE_CLASS}; "
                f"likely cause: {cause}"
            )
    return found


def _cause(stage: str) -> str:
    return stage if stage in CAUSES else "predictions"


def present_classes(samples: Iterable[Sample]) -> set[int]:
    return {k for sample in samples for k in sample.labels}


def check_folder(
    folder: Path,
    samples: list[Sample],
    names: list[str],
    stage: str,
    what: str,
    check_dominant: bool = True,
    also: str = "",
) -> list[str]:
    """Count `folder`'s label maps of `samples`, warn (stderr) and return the warnings."""
    counts = label_counts(folder, [s.id for s in samples], len(names) + 1)
    present = present_classes(samples)
    found = collapse_warnings(counts, present, names, stage, what, check_dominant, also)
    for line in found:
        warnings.warn(line, stacklevel=2)
    return found


def verdict(stage_warnings: dict[str, list[str]]) -> str:
    """The closing line of `aepsl run`: healthy, or how many warnings and where."""
    count = sum(len(v) for v in stage_warnings.values())
    if not count:
        return "health: no stage collapsed; the run looks healthy"
    stages = ", ".join(stage for stage, found in stage_warnings.items() if found)
    return (
        f"health: {count} warning(s) ({stages}): the run does NOT look healthy; "
        "see the warnings above and the top of report.html"
    )
