"""Where the pseudo labels put the ground truth's pixels, and what labels.salient_fill would add.

Needs a finished `aepsl labels` run whose mining kept its CAMs (mine.save_cams=true or
labels.salient_fill=true), with the built-in saliency cache, on a dataset with masks:

    python benchmarks/label_breakdown.py configs/own_data.yaml --out runs/x data.root=DATA

Over the training images it prints the share of object pixels (mask > 0) labelled their class,
another class, background, or left unlabelled (and of those, salient: saliency at least
labels.bg_threshold), the same for background pixels; then, for CAM floors 0.2 ... 0.5, what
filling the unlabelled salient pixels with the strongest tag would label (share of all pixels),
its precision and the object recall it adds, with step 1's CAMs and with each class's most over
the steps the union used (what labels.salient_fill does).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aepsl.config import load_config
from aepsl.data.datasets import load_dataset
from aepsl.external import image_cams, most_image_cams
from aepsl.io import read_gray_png, read_index_png, read_json
from aepsl.labelmap import IGNORE
from aepsl.labels.fusion import fill_from_cams
from aepsl.layout import RunLayout

FLOORS = (0.2, 0.3, 0.4, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True, help="the run folder")
    args = parser.parse_intermixed_args()
    config = load_config(args.config, args.overrides)
    run = RunLayout(Path(args.out), config)
    data = load_dataset(config.data)
    used = read_json(run.mine_metrics, run.redo("mine"))["steps_used"]
    counts: dict[str, int] = dict.fromkeys(
        ("object", "right", "wrong", "as_bg", "unlabelled", "salient_unlabelled", "background"),
        0,
    ) | dict.fromkeys(("bg_labelled", "bg_unlabelled", "bg_as_object"), 0)
    fills = {(cams, floor): [0, 0] for cams in ("step 1", "most over steps") for floor in FLOORS}
    pixels = 0
    for sample in data.training_split(config.data.train_split):
        if sample.mask is None:
            raise SystemExit(f"{sample.image}: no mask; the breakdown needs masks")
        mask = read_index_png(sample.mask)
        label = read_index_png(run.pseudo_label(sample.id))
        salient = read_gray_png(run.saliency_map(sample.id)) >= config.labels.bg_threshold
        valid, obj = mask != IGNORE, (mask > 0) & (mask != IGNORE)
        bg, unlabelled = mask == 0, label == IGNORE
        pixels += int(valid.sum())
        counts["object"] += int(obj.sum())
        counts["right"] += int((obj & (label == mask)).sum())
        counts["as_bg"] += int((obj & (label == 0)).sum())
        counts["unlabelled"] += int((obj & unlabelled).sum())
        counts["salient_unlabelled"] += int((obj & unlabelled & salient).sum())
        counts["wrong"] += int((obj & (label != mask) & (label != 0) & ~unlabelled).sum())
        counts["background"] += int(bg.sum())
        counts["bg_labelled"] += int((bg & (label == 0)).sum())
        counts["bg_unlabelled"] += int((bg & unlabelled).sum())
        counts["bg_as_object"] += int((bg & (label != 0) & ~unlabelled).sum())
        tags = list(sample.labels)
        shape = mask.shape
        folders = [run.step(step).cams for step in used]
        step1 = image_cams(folders[0], sample, data.num_classes, shape)
        most = most_image_cams(folders, sample, data.num_classes, shape)
        for (name, floor), tally in fills.items():
            cams = step1 if name == "step 1" else most
            filled = fill_from_cams(label, cams, tags, ~salient, floor)
            new = (filled != label) & valid
            tally[0] += int(new.sum())
            tally[1] += int((new & (filled == mask)).sum())
    obj, bg = counts["object"], counts["background"]
    print(f"{args.out}: {pixels} pixels scored, {obj / pixels:.3f} of them object")
    print(
        f"object pixels: {counts['right'] / obj:.3f} their class, {counts['wrong'] / obj:.3f} "
        f"another class, {counts['as_bg'] / obj:.3f} background, {counts['unlabelled'] / obj:.3f} "
        f"unlabelled ({counts['salient_unlabelled'] / obj:.3f} salient)"
    )
    print(
        f"background pixels: {counts['bg_labelled'] / bg:.3f} background, "
        f"{counts['bg_as_object'] / bg:.3f} an object class, "
        f"{counts['bg_unlabelled'] / bg:.3f} unlabelled"
    )
    print(
        "fill of the unlabelled salient pixels: CAMs, floor, share of pixels, precision, recall +"
    )
    for (name, floor), (added, right) in fills.items():
        print(
            f"  {name:>15} {floor:.1f} {added / pixels:.3f} {right / max(added, 1):.3f} "
            f"{right / obj:+.3f}"
        )


if __name__ == "__main__":
    main()
