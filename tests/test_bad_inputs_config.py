"""Bad configuration through the command line: values of the wrong type or range, values
that would fail in a later stage, config files that are not valid YAML, not UTF-8, carry
Python tags or alias bombs, and contradicting external label settings.

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.

Already covered elsewhere with these assertions, so not repeated here: unknown config key
on the command line: tests/test_cli.py::test_unknown_key_exits_2_with_one_line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DEMO, refuse

# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.threshold=2", "config key 'mine.threshold': Input should be less than 1 (got 2)"),
        ("mine.threshold=0", "config key 'mine.threshold': Input should be greater than 0"),
        ("mine.steps=abc", "config key 'mine.steps': Input should be a valid integer"),
        ("mine.steps=0", "config key 'mine.steps': Input should be greater than or equal to 1"),
        ("mine.cam_flip=maybe", "config key 'mine.cam_flip': Input should be a valid boolean"),
        (
            "precision=fp64",
            "config key 'precision': Input should be 'auto', 'fp32', 'bf16' or 'fp16'",
        ),
        ("data.empty_labels=ignore", "config key 'data.empty_labels'"),
        ("mine=3", "config key 'mine' must be a section (mapping)"),
    ],
)
def test_config_value_of_wrong_type_or_range(capsys, tmp_path, data, override, message):
    argv = ["data-info", DEMO, f"data.root={data}", override, "--check"]
    refuse(capsys, tmp_path, argv, f"command line: {message}")


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_config_file_wrong_value_and_unknown_key(capsys, tmp_path, data):
    path = _config_file(tmp_path, "mine:\n  threshold: high\n")
    argv = ["data-info", str(path), f"data.root={data}", "--check"]
    refuse(capsys, tmp_path, argv, f"{path}: config key 'mine.threshold': Input should be")
    path.write_text("mine:\n  thresold: 0.5\n")
    refuse(
        capsys,
        tmp_path,
        argv,
        f"{path}: unknown config key 'mine.thresold'; did you mean 'mine.threshold'?",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("mine:\n  steps: [3\n", "invalid YAML at line 3, column 1 (expected ',' or ']'"),
        ("mine:\n\tsteps: 3\n", "invalid YAML at line 2, column 1 (found character '\\t'"),
        ("- 1\n- 2\n", "config file must be a mapping"),
    ],
)
def test_config_file_not_valid_yaml(capsys, tmp_path, data, text, message):
    path = _config_file(tmp_path, text)
    refuse(capsys, tmp_path, ["data-info", str(path), f"data.root={data}"], f"{path}: {message}")


def test_config_file_not_utf8(capsys, tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    refuse(
        capsys,
        tmp_path,
        ["data-info", str(path), f"data.root={data}"],
        f"{path}: cannot read config file",
    )


@pytest.mark.parametrize(
    "template",
    [
        "seed: !!python/object/apply:os.system ['touch {marker}']\n",
        "seed: !!python/object/apply:subprocess.call [['touch', '{marker}']]\n",
    ],
)
def test_config_file_with_python_tag_is_refused(capsys, tmp_path, data, template):
    marker = tmp_path / "pwned"
    path = _config_file(tmp_path, template.format(marker=marker))
    refuse(
        capsys,
        tmp_path,
        ["data-info", str(path), f"data.root={data}"],
        f"{path}: invalid YAML at line 1, column 7",
        "could not determine a constructor for the tag",
    )
    assert not marker.exists()


# ------------------------------------------------------------------ issue 15: hostile files


ALIAS_BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
mine:
  cam_scales: [*f, *f, *f, *f, *f, *f, *f, *f, *f]
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (ALIAS_BOMB, "invalid YAML at line 2, column 8 (alias *a is not allowed in a config file"),
        (
            "mine:\n  cam_scales: &s [1.0]\npredict:\n  scales: *s\n",
            "invalid YAML at line 4, column 11 (alias *s is not allowed in a config file",
        ),
        (
            "base: &base {steps: 2}\nmine:\n  <<: *base\n",
            "invalid YAML at line 3, column 7 (alias *base is not allowed",
        ),
        ("mine:\n  steps: " + "x" * 100_000 + "\n", "config key 'mine.steps': Input should be"),
        ("mine:\n  " + "k" * 1000 + ": 1\n", "unknown config key 'mine.kkkkkkkk"),
    ],
)
def test_config_file_bombs_give_a_short_line(capsys, tmp_path, data, text, message):
    """YAML aliases are refused (a 500-byte config would expand to millions of items), and no
    value is quoted at length."""
    path = _config_file(tmp_path, text)
    line = refuse(capsys, tmp_path, ["data-info", str(path), f"data.root={data}"], message)
    assert len(line) < 400, len(line)


# ------------------------------------------------------------------ issue 15: settings


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.cam_scales=[]", "config key 'mine.cam_scales': List should have at least 1 item"),
        ("mine.cam_scales=[0]", "config key 'mine.cam_scales.0': Input should be greater than 0"),
        ("mine.cam_scales=[1, -1]", "config key 'mine.cam_scales.1': Input should be greater"),
        ("mine.cam_scales=[15]", "config key 'mine.cam_scales.0': Input should be less than or"),
        ("predict.scales=[]", "config key 'predict.scales': List should have at least 1 item"),
        ("predict.scales=[0.5, 0]", "config key 'predict.scales.1': Input should be greater"),
        ("predict.scales=[.nan]", "config key 'predict.scales.0': Input should be a finite number"),
        (
            "train.scale_range=[1.3, 0.7]",
            "config key 'train.scale_range': must be (low, high) with low <= high (got [1.3, 0.7])",
        ),
        ("train.scale_range=[0, 1]", "config key 'train.scale_range.0': Input should be greater"),
        ("train.scale_range=[-1, 1]", "config key 'train.scale_range.0': Input should be greater"),
        ("train.scale_range=[1]", "config key 'train.scale_range.1': Field required"),
        ("seed=-1", "config key 'seed': Input should be greater than or equal to 0 (got -1)"),
        ("seed=4294967296", "config key 'seed': Input should be less than 4294967296"),
        ("mine.lr=.inf", "config key 'mine.lr': Input should be a finite number (got inf)"),
        ("train.lr=.nan", "config key 'train.lr': Input should be a finite number (got nan)"),
        ("data.root=", "config key 'data.root': must not be empty (the dataset folder)"),
        ("data.train_split=", "config key 'data.train_split': String should have at least 1"),
        ("data.max_pixels=0", "config key 'data.max_pixels': Input should be greater than or"),
        ("data.image_size=100000", "config key 'data.image_size': Input should be less than or"),
        ("data.num_workers=100000", "config key 'data.num_workers': Input should be less than"),
        ("crf.workers=100000", "config key 'crf.workers': Input should be less than or equal"),
        ("model.weights=", "config key 'model.weights': String should have at least 1 character"),
        (
            "train.psl_warmup=6000",  # a command-line length replaces the preset's epochs
            "config key 'train.psl_warmup': must be less than train.iterations (1200)",
        ),
    ],
)
def test_config_value_that_would_fail_later(capsys, tmp_path, data, override, message):
    """Each passed the schema before and crashed (or silently did nothing) in a stage."""
    argv = ["data-info", DEMO, f"data.root={data}", override, "--check"]
    if override.startswith("train.psl_warmup"):
        argv.insert(3, "train.iterations=1200")
    if override.startswith("data.root="):
        argv = ["data-info", DEMO, override, "--check"]
    refuse(capsys, tmp_path, argv, f"command line: {message}")


# ------------------------------------------------------------------ external CAMs and labels


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["labels.dir=theirs", "labels.cams_dir=cams"],
            "command line: config key 'labels.cams_dir': give labels.dir (finished pseudo "
            "labels) or labels.cams_dir, not both (got 'cams')",
        ),
        (
            ["labels.crf=fill", "labels.dir=theirs"],
            "command line: config key 'labels.dir': labels.crf refines the pseudo labels aepsl "
            "builds; with labels.dir none are built: set labels.crf=none (got 'theirs')",
        ),
        (
            ["mine.step1_cams="],
            "command line: config key 'mine.step1_cams': must not be empty (a folder of CAMs, or "
            "null) (got '')",
        ),
        (
            ["labels.dir="],
            "command line: config key 'labels.dir': must not be empty (a folder, or null) (got '')",
        ),
        (
            ["labels.cams_dir="],
            "command line: config key 'labels.cams_dir': must not be empty (a folder, or null) "
            "(got '')",
        ),
        (
            ["mine.cam_format=png"],
            "command line: config key 'mine.cam_format': Input should be 'npz' or 'irn' (got "
            "'png')",
        ),
    ],
    ids=["both", "crf-on-theirs", "empty-step1-cams", "empty-dir", "empty-cams-dir", "cam-format"],
)
def test_external_settings(capsys, tmp_path, data, overrides, message):
    argv = ["data-info", DEMO, f"data.root={data}", *overrides, "--check"]
    assert refuse(capsys, tmp_path, argv) == f"aepsl data-info: error: {message}"


def test_both_external_label_sources_in_a_config_file(capsys, tmp_path, data):
    config = _config_file(tmp_path, "labels:\n  dir: theirs\n  cams_dir: cams\n")
    argv = ["data-info", str(config), f"data.root={data}", "--check"]
    assert refuse(capsys, tmp_path, argv) == (
        f"aepsl data-info: error: {config}: config key 'labels.cams_dir': give labels.dir "
        "(finished pseudo labels) or labels.cams_dir, not both (got 'cams')"
    )
