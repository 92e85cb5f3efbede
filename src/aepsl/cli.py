"""The `aepsl` command: one subcommand per pipeline stage, with shared conventions.

Every stage command takes a config file (or none, for the defaults), `--out DIR`, and trailing
`key=value` overrides of any config key. Bad input ends with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from aepsl import __version__
from aepsl.config import Config, load_config, save_config
from aepsl.errors import UserError

Command = Callable[[argparse.Namespace], int | None]


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _config_and_out(args: argparse.Namespace, reads: str | None = None) -> tuple[Config, Path]:
    """The config, and the --out folder checked (outside the dataset, writable; the stage it
    `reads` made with these settings) with the resolved config saved in it."""
    from aepsl.layout import RunLayout, check_out

    config = _config(args)
    check_out(Path(args.out), config)
    if reads is not None:
        RunLayout(args.out, config).check_input(reads)
    out = _writable_out(args.out)
    save_config(config, out)
    return config, out


def _writable_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is an existing file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".aepsl-write-test.", dir=out)  # unique per rank
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise UserError(f"{out}: output folder is not writable ({exc.strerror})") from None
    return out


# ------------------------------------------------------------------ commands


def cmd_synth(args: argparse.Namespace) -> None:
    from aepsl.data.real import make_real
    from aepsl.data.synth import make_synth

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(
            f"{out}: folder is not empty; choose a new one, or --force to write into it"
        )
    make = make_real if args.real else make_synth
    counts = {"objects": args.objects}
    if args.classes is not None:
        counts["classes"] = args.classes
    root = make(args.out, n=args.n, size=args.size, seed=args.seed, **counts)
    print(f"wrote a folder dataset to {root}")


def cmd_data_info(args: argparse.Namespace) -> None:
    from aepsl.data.datasets import image_size, load_dataset, validate

    config = _config(args)
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    print(f"dataset: {data.root} ({config.data.format}), {data.num_classes} classes")
    for reason, count in data.skipped.items():
        print(f"skipped: {count} image(s) with {reason}")
    names = ["images", "masks", "saliency", *data.classes]
    print(f"{'split':<12}" + "".join(f"{n[:10]:>11}" for n in names))
    for split, samples in data.splits.items():
        counts = [
            len(samples),
            sum(s.mask is not None for s in samples),
            sum(s.saliency is not None for s in samples),
        ] + [sum(k + 1 in s.labels for s in samples) for k in range(data.num_classes)]
        print(f"{split:<12}" + "".join(f"{c:>11}" for c in counts))
        if samples:
            sizes = [image_size(s.image) for s in samples[:200]]
            heights, widths = zip(*sizes, strict=True)
            print(
                f"{'':<12}image size (first {len(sizes)}): height {min(heights)}-{max(heights)}, "
                f"width {min(widths)}-{max(widths)}"
            )
        if args.check:
            validate(data, split)
            print(f"{'':<12}all images and masks decode and agree in size")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from aepsl.data.datasets import load_dataset
    from aepsl.evaluation import evaluate_folder, format_table
    from aepsl.io import read_json, write_json

    config = _config(args)
    pred_dir = Path(args.pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: prediction folder not found")
    out = _writable_out(args.out or args.pred_dir)
    target = out / "metrics.json"
    # a stage's own metrics (e.g. RUN/labels/metrics.json, with its warnings) are not replaced
    give_out = "give --out DIR for the scores"
    if target.is_file() and "predictions" not in read_json(target, give_out):
        raise UserError(f"{target}: the metrics of another aepsl command; {give_out}")
    data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
    split = args.split or config.data.val_split
    result = evaluate_folder(pred_dir, data.split(split), data.classes, args.pred_ignore)
    result["split"] = split
    result["predictions"] = str(pred_dir)  # what was scored; marks the file as evaluate's
    print(format_table(result))
    write_json(target, result)
    save_config(config, out)
    print(f"wrote {target}")


def cmd_prepare_voc(args: argparse.Namespace) -> None:
    from aepsl.data.voc_prepare import prepare_voc

    counts = prepare_voc(Path(args.voc), Path(args.sbd))
    print(
        f"{counts['mask_dir']}: wrote {counts['masks_from_voc']} masks from VOC and "
        f"{counts['masks_from_sbd']} from SBD; {counts['masks_existing']} already there, left alone"
    )
    print(f"{counts['list_path']}: {counts['train_aug']} ids ({counts['list']})")


def cmd_mine(args: argparse.Namespace) -> None:
    from aepsl.mine.stage import run_mine

    config, out = _config_and_out(args)
    run_mine(config, out)


def cmd_labels(args: argparse.Namespace) -> None:
    from aepsl.labels.stage import run_labels
    from aepsl.runtime import on_main, select_device

    config, out = _config_and_out(args, reads="mine")
    select_device(config)  # joins the process group under torchrun
    on_main(run_labels, config, out)


def cmd_train(args: argparse.Namespace) -> None:
    from aepsl.inference.predict import evaluate_trained
    from aepsl.psl.stage import run_train
    from aepsl.runtime import select_device

    config, out = _config_and_out(args, reads="labels")
    model = run_train(config, out)
    result = evaluate_trained(config, out, model, select_device(config))
    for key in ("without_crf", "with_crf"):
        if result.get(key):
            print(f"val mIoU {key.replace('_', ' ')}: {result[key]['mIoU']:.3f}")
    if result.get("note"):
        print(result["note"])


def cmd_predict(args: argparse.Namespace) -> None:
    from aepsl.data.datasets import load_dataset
    from aepsl.health import check_folder
    from aepsl.inference.predict import (
        VOC_TEST_LAYOUT,
        images_in,
        predict_samples,
        write_voc_archive,
    )
    from aepsl.io import file_digest, write_json
    from aepsl.layout import check_out, mark_complete, settings_digest
    from aepsl.models.segnet import load_segnet
    from aepsl.runtime import is_main, on_main, prepare_model, select_device

    config = _config(args)
    if (args.split is None) == (args.images is None):
        raise UserError("give exactly one of --split NAME or --images DIR")
    voc_test = args.format == "voc-test"
    if voc_test:  # the server's folder holds index PNGs only
        config.predict.overlays = False
    model = load_segnet(args.checkpoint, config)  # built as the file says
    classes = model.classifier.out_channels - 1
    if args.images:
        samples = images_in(Path(args.images))
        names = [f"label {k}" for k in range(1, classes + 1)]  # for the health check
    else:
        data = load_dataset(config.data.format, config.data.root, config.data.empty_labels)
        samples, names = data.split(args.split), data.classes
        if classes != data.num_classes:
            raise UserError(
                f"{args.checkpoint}: a network of {classes} classes; the dataset in "
                f"{config.data.root} has {data.num_classes}"
            )
    check_out(Path(args.out), config)
    if args.images and Path(args.out).resolve() == Path(args.images).resolve():
        raise UserError(f"{args.out}: --out is the --images folder; write predictions elsewhere")
    device = select_device(config)
    model = prepare_model(model, config, device)
    out = _writable_out(args.out)
    target = out / VOC_TEST_LAYOUT if voc_test else out
    # Predictions already in the folder count only if this checkpoint and these settings made
    # them (the folder's manifest); others are redone.
    made_by = {
        "model": file_digest(args.checkpoint),
        "predict": config.predict.model_dump(),
        "crf": config.crf.model_dump(exclude={"workers"}) if args.crf else None,
    }
    on_main(_claim_predictions, out, target, settings_digest(made_by))
    save_config(config, out)
    before = sum((target / f"{s.id}.png").is_file() for s in samples)
    predict_samples(
        model,
        samples,
        config,
        device,
        None if args.crf else target,
        target if args.crf else None,
        sharded=True,
    )
    # a class of the split's image labels never predicted, or one class nearly everywhere
    found = on_main(check_folder, target, samples, names, "predict", "predictions")
    on_main(write_json, out / "health.json", {"images": len(samples), "warnings": found})
    on_main(mark_complete, out, settings_digest(made_by))
    kept = f" ({before} already there for this checkpoint and settings)" if before else ""
    print(f"wrote {len(samples) - before} predictions to {target}{kept}")
    if voc_test and is_main():
        archive = write_voc_archive(out, [s.id for s in samples])
        print(f"wrote {archive}: upload it to the VOC evaluation server")


def _claim_predictions(out: Path, target: Path, digest: str) -> None:
    """claim_folder for `predict`'s --out (its manifest beside the results: voc-test's folder
    holds PNGs only), refusing one whose `target` holds PNGs aepsl did not write (no
    manifest): they would be taken for predictions, or overwritten."""
    from aepsl.layout import claim_folder

    if not (out / "manifest.json").is_file() and any(target.glob("*.png")):
        raise UserError(
            f"{target}: holds PNG files that `aepsl predict` did not write (no manifest.json); "
            "choose an empty or new --out"
        )
    claim_folder(out, digest)


def cmd_run(args: argparse.Namespace) -> None:
    from aepsl.pipeline import run_pipeline

    config, out = _config_and_out(args)
    run_pipeline(config, out)


def cmd_demo(args: argparse.Namespace) -> None:
    from aepsl.demo import run_demo

    run_demo(_writable_out(args.out), args.overrides, real=args.real, tiny=args.tiny)


# ------------------------------------------------------------------ parser


def _common() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def _stage_parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, parents=[_common()])
    parser.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aepsl",
        description="AE-PSL weakly-supervised semantic segmentation: image tags in, masks out.",
    )
    parser.add_argument("--version", action="version", version=f"aepsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "synth", help="write a synthetic folder dataset with ground truth", parents=[_common()]
    )
    p.add_argument("out", help="folder to write")
    p.add_argument("--n", type=int, default=240, help="number of images (default 240)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.add_argument(
        "--classes",
        type=int,
        default=None,
        help="number of classes: 2..20 (default 5), with --real 2..10 (default 5)",
    )
    p.add_argument(
        "--objects",
        type=int,
        default=None,
        help="at most this many objects per image, 1..N equally likely, N <= classes "
        "(default: 1 to 3, weighted 40/35/25%%)",
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="real pixels: product photos pasted on photographs, exact masks (needs Debian's "
        "dataset-fashion-mnist)",
    )
    p.set_defaults(func=cmd_synth)

    p = _stage_parser(sub, "data-info", "print counts per split and class, sizes, masks")
    p.add_argument("--check", action="store_true", help="decode every image and mask")
    p.set_defaults(func=cmd_data_info)

    p = sub.add_parser(
        "evaluate", help="score index PNGs against ground truth (mIoU)", parents=[_common()]
    )
    p.add_argument("pred_dir", help="folder of <id>.png index predictions")
    p.add_argument("config", nargs="?", help="YAML config file naming the dataset")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--split", help="split to score (default: data.val_split)")
    p.add_argument("--out", help="where to write metrics.json (default: PRED_DIR)")
    p.add_argument(
        "--pred-ignore",
        choices=["exclude", "background"],
        default="exclude",
        help="predicted 255 pixels: excluded (default) or counted as background",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "prepare-voc",
        help="add SBD's masks (SegmentationClassAug/) and the train_aug split to VOC 2012",
        description="Adds SegmentationClassAug/<id>.png and ImageSets/Segmentation/train_aug.txt "
        "to VOC 2012 from the SBD release; only adds files, never overwrites or deletes.",
        parents=[_common()],
    )
    p.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (files are added here)")
    p.add_argument("--sbd", required=True, help="SBD's benchmark_RELEASE folder (read only)")
    p.set_defaults(func=cmd_prepare_voc)

    p = _stage_parser(sub, "mine", "stage 1: mine object regions by adversarial erasing")
    p.add_argument("--out", required=True, help="run folder (writes OUT/mine)")
    p.set_defaults(func=cmd_mine)

    p = _stage_parser(sub, "labels", "stage 2: fuse mined regions and saliency into pseudo labels")
    p.add_argument("--out", required=True, help="run folder (reads OUT/mine, writes OUT/labels)")
    p.set_defaults(func=cmd_labels)

    p = _stage_parser(sub, "train", "stage 3: train the segmentation network with PSL")
    p.add_argument("--out", required=True, help="run folder (reads OUT/labels, writes OUT/train)")
    p.set_defaults(func=cmd_train)

    p = _stage_parser(sub, "predict", "segment images with a trained network")
    p.add_argument("--checkpoint", required=True, help="OUT/train/model.pt of `aepsl train`")
    p.add_argument("--split", help="predict this split of the configured dataset")
    p.add_argument("--images", help="or every image of this folder")
    p.add_argument("--out", required=True, help="folder for <id>.png (and overlay/)")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF (extra 'crf')")
    p.add_argument(
        "--format",
        choices=["png", "voc-test"],
        default="png",
        help="voc-test: index PNGs (no overlays) in results/VOC2012/Segmentation/"
        "comp6_test_cls/ and OUT/results.tgz of them, as the VOC evaluation server takes them",
    )
    p.set_defaults(func=cmd_predict)

    p = _stage_parser(sub, "run", "the whole method: mine, labels, train, val prediction, report")
    p.add_argument("--out", required=True, help="run folder (all stages, OUT/report.html)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "demo",
        help="the whole method on synthetic data: configs/demo.yaml (ImageNet EfficientNet-Lite0) "
        "when aepsl[offline] is installed, else configs/demo_tiny.yaml",
        parents=[_common()],
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--real", action="store_true", help="on `synth --real` data: photographs")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="configs/demo_tiny.yaml (a tiny CNN from scratch) even when the ImageNet "
        "EfficientNet-Lite0 of aepsl[offline] is installed",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking `key=value` overrides anywhere after the command, before or after options
    (`aepsl mine CONFIG --out RUN mine.steps=2`), and a first positional holding '=' that is no
    file as an override rather than a config path."""
    args, extra = parser.parse_known_args(argv)
    unknown = [token for token in extra if token.startswith("-") or "=" not in token]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # argparse's own message and exit 2
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by clusters and `kill` before a hard stop), handled like Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _close_progress_bars() -> None:
    """End every open progress bar's line, so an error or interrupt line starts its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    signal.signal(signal.SIGTERM, _terminate)
    warnings.simplefilter("default")
    # A file left open by an interrupted read is no news to a user (it printed after the
    # one line of a SIGTERM): interpreter diagnostics stay out of the command's output.
    warnings.filterwarnings("ignore", category=ResourceWarning)
    warnings.formatwarning = lambda message, *_: f"aepsl {args.command}: warning: {message}\n"
    try:
        try:
            args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        except BaseException:
            _close_progress_bars()
            raise
    except UserError as exc:
        if args.debug:
            raise
        print(f"aepsl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: not bad input, but no traceback
        if args.debug:
            raise
        print(f"aepsl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`aepsl data-info ... | head`): end quietly, with
        # stdout pointed at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if args.debug:
            raise
        where = exc.filename or "output"
        if exc.errno == errno.ENOSPC:
            print(
                f"aepsl {args.command}: error: {where}: no space left on device; nothing is "
                "half-written: free some space and re-run the same command to resume",
                file=sys.stderr,
            )
        else:
            print(f"aepsl {args.command}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"aepsl {args.command}: {what}; re-run the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    return 0
