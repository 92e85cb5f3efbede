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
import warnings
from collections.abc import Callable
from pathlib import Path

from aepsl.config import Config, load_config
from aepsl.errors import UserError
from aepsl.version import __version__

Command = Callable[[argparse.Namespace], int | None]


def _config(args: argparse.Namespace) -> Config:
    """The config the command line names: a YAML path or a preset name (or none: the
    defaults), with the key=value overrides applied."""
    from aepsl.presets import resolve_config_path

    return load_config(resolve_config_path(args.config), args.overrides)


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
    from aepsl.data.info import data_info

    data_info(_config(args), args.check)


def cmd_evaluate(args: argparse.Namespace) -> None:
    import aepsl.api as api

    config = _config(args)
    api.evaluate(
        args.pred_dir, config, out=args.out, split=args.split, pred_ignore=args.pred_ignore
    )


def cmd_prepare_voc(args: argparse.Namespace) -> None:
    from aepsl.data.voc_prepare import prepare_voc

    counts = prepare_voc(Path(args.voc), Path(args.sbd))
    print(
        f"{counts['mask_dir']}: wrote {counts['masks_from_voc']} masks from VOC and "
        f"{counts['masks_from_sbd']} from SBD; {counts['masks_existing']} already there, left alone"
    )
    print(f"{counts['list_path']}: {counts['train_aug']} ids ({counts['list']})")


def cmd_stage(args: argparse.Namespace) -> None:
    """`aepsl mine`, `aepsl labels`, `aepsl train`."""
    import aepsl.api as api

    api.run_stage(args.command, _config(args), args.out)


def cmd_predict(args: argparse.Namespace) -> None:
    import aepsl.api as api

    api.predict(
        args.checkpoint,
        args.out,
        _config(args),
        split=args.split,
        images=args.images,
        crf=args.crf,
        format=args.format,
    )


def cmd_run(args: argparse.Namespace) -> None:
    import aepsl.api as api

    api.run(_config(args), args.out)


def cmd_export(args: argparse.Namespace) -> None:
    from aepsl.export import export_onnx

    config = _config(args) if args.config or args.overrides else None
    print(f"wrote {export_onnx(args.checkpoint, args.out, config)}")


def cmd_presets(args: argparse.Namespace) -> None:
    from aepsl.presets import describe, preset_names, preset_text

    if args.name:
        print(preset_text(args.name), end="")
        return
    for name in preset_names():
        print(describe(name))


def cmd_demo(args: argparse.Namespace) -> None:
    from aepsl.demo import run_demo
    from aepsl.layout import writable_out

    run_demo(writable_out(args.out), args.overrides, real=args.real, tiny=args.tiny)


# ------------------------------------------------------------------ parser


def _common() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def _stage_parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help, description=help, parents=[_common()])
    parser.add_argument(
        "config",
        nargs="?",
        help="a preset's name (`aepsl presets`) or a YAML file (default: built-in defaults)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aepsl",
        description="AE-PSL weakly-supervised semantic segmentation: image tags in, masks out.",
    )
    parser.add_argument("--version", action="version", version=f"aepsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_data_commands(sub)
    _add_stage_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """synth, data-info, evaluate, prepare-voc: data sets and scores."""
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
    p.add_argument("config", nargs="?", help="a preset's name or a YAML file naming the dataset")
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


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """mine, labels, train, predict, run: the method's stages."""
    p = _stage_parser(sub, "mine", "stage 1: mine object regions by adversarial erasing")
    p.add_argument("--out", required=True, help="run folder (writes OUT/mine)")
    p.set_defaults(func=cmd_stage)

    p = _stage_parser(sub, "labels", "stage 2: fuse mined regions and saliency into pseudo labels")
    p.add_argument("--out", required=True, help="run folder (reads OUT/mine, writes OUT/labels)")
    p.set_defaults(func=cmd_stage)

    p = _stage_parser(sub, "train", "stage 3: train the segmentation network with PSL")
    p.add_argument("--out", required=True, help="run folder (reads OUT/labels, writes OUT/train)")
    p.set_defaults(func=cmd_stage)

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


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """export, presets, demo."""
    p = _stage_parser(
        sub,
        "export",
        "write a trained network as an ONNX file (extra 'onnx'; docs/api.md): input images "
        "(N, 3, H, W) float32 RGB in [0, 1], dynamic batch and size; outputs probabilities "
        "(N, C+1, H, W) and labels (N, H, W) uint8. CONFIG only for a model file of an earlier "
        "version, without its settings",
    )
    p.add_argument("--checkpoint", required=True, help="OUT/train/model.pt of `aepsl train`")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only one)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "presets",
        help="list the presets shipped with aepsl, or print one (to copy and edit)",
        description="Every command that takes CONFIG takes a preset's name too: "
        "`aepsl run own_data data.root=DATA --out RUN`.",
        parents=[_common()],
    )
    p.add_argument("name", nargs="?", help="print this preset's YAML")
    p.set_defaults(func=cmd_presets)

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
