"""Bad checkpoints given to `aepsl predict`: unreadable, not a dictionary of tensors,
another model's, keys or class count that do not fit, and pickles that would run code.

The contract of each refusal (exit status 2, exactly one line on stderr naming the file or
config key and the problem, no traceback, no warning, nothing written outside `--out`) is
checked by helpers.refuse; docs/bad_inputs.md is the table.
"""

from __future__ import annotations

import builtins
import os
import pickle
import posix
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import DEMO, WritesMarker, refuse

from aepsl.models import build_classifier
from aepsl.models.saved import model_record
from aepsl.models.segnet import build_segnet

# Checkpoint messages: today's wording, or the clearer one proposed in docs/bad_inputs.md.
UNREADABLE = re.compile(r"not a (loadable weights-only|readable PyTorch) checkpoint")
REFUSED = re.compile(r"not a loadable weights-only checkpoint|refused: loading it would run")


# ------------------------------------------------------------------ checkpoints


class Custom:
    """A class a weights-only loader must not import."""

    def __init__(self) -> None:
        self.value = 1


def predict(capsys, tmp_path: Path, data: Path, checkpoint: Path, *fragments: str) -> str:
    out = tmp_path / "pred"
    argv = ["predict", DEMO, "--checkpoint", str(checkpoint), "--images", str(data / "images")]
    line = refuse(capsys, tmp_path, [*argv, "--out", str(out)], f"{checkpoint}: ", *fragments)
    assert not out.exists()
    return line


def _segnet_state() -> dict[str, torch.Tensor]:
    return build_segnet("tiny", "none", 2).state_dict()


@pytest.mark.parametrize("kind", ["garbage", "text", "empty", "truncated"])
def test_unreadable_checkpoint(capsys, tmp_path, data, kind):
    path = tmp_path / "model.pt"
    if kind == "truncated":
        torch.save(_segnet_state(), path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_bytes(
            {"garbage": bytes(range(256)), "text": b"not a checkpoint\n" * 20, "empty": b""}[kind]
        )
    line = predict(capsys, tmp_path, data, path)
    assert UNREADABLE.search(line), line


def test_checkpoint_that_is_a_tensor(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save(torch.zeros(3, 4), path)
    predict(capsys, tmp_path, data, path, "checkpoint is not a dictionary of tensors")


@pytest.mark.parametrize("kind", ["foreign", "classifier"])
def test_checkpoint_of_another_model(capsys, tmp_path, data, kind):
    """A dict of tensors that is not a segmentation network (e.g. mine's classifier.pt)."""
    path = tmp_path / "model.pt"
    state = (
        {"encoder.weight": torch.zeros(2, 2)}
        if kind == "foreign"
        else build_classifier("tiny", "none", 2).state_dict()
    )
    torch.save(state, path)
    predict(capsys, tmp_path, data, path, "not an aepsl segmentation checkpoint (model.pt)")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_checkpoint_whose_keys_do_not_fit(capsys, tmp_path, data, change):
    state = _segnet_state()
    if change == "missing":
        del state["head.0.weight"]
    elif change == "unexpected":
        state["extra.weight"] = torch.zeros(1)
    else:
        state["head.0.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    expected = {"missing": "Missing key(s)", "unexpected": "Unexpected key(s)", "shape": "size"}
    predict(capsys, tmp_path, data, path, "does not fit model.backbone=tiny", expected[change])


def test_checkpoint_with_a_custom_class_is_refused(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save({**_segnet_state(), "extra": Custom()}, path)
    line = predict(capsys, tmp_path, data, path)
    assert REFUSED.search(line), line


def test_checkpoint_that_runs_code_is_refused(capsys, tmp_path, data):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({**_segnet_state(), "extra": WritesMarker(marker)}, path)
    # The payload is live: an unsafe load would create the marker (checked on a copy elsewhere).
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    probe.mkdir()
    torch.save({"extra": WritesMarker(probe / "pwned")}, probe / "model.pt")
    torch.load(probe / "model.pt", weights_only=False)
    assert (probe / "pwned").exists()
    shutil.rmtree(probe)

    line = predict(capsys, tmp_path, data, path)
    assert REFUSED.search(line), line
    assert not marker.exists()


def test_checkpoint_refusal_names_the_class(capsys, tmp_path, data):
    path = tmp_path / "model.pt"
    torch.save({"extra": WritesMarker(tmp_path / "pwned")}, path)
    line = predict(capsys, tmp_path, data, path)
    assert "io.open" in line and "\x1b" not in line and "weights_only" not in line


# ------------------------------------------------------------------ issue 15: messages


class Reduces:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.mark.parametrize(
    "function, how, name",
    [
        (os.system, "pickle-2", "posix.system"),
        (os.system, "torch.save", "posix.system"),
        (posix.system, "pickle-2", "posix.system"),
        (posix.system, "torch.save", "posix.system"),
        (os.system, "pickle-5", "posix.system"),  # STACK_GLOBAL: torch stops before naming it
        (subprocess.call, "pickle-2", "subprocess.call"),  # pickled as commands.call
        (builtins.eval, "torch.save", "builtins.eval"),
        (builtins.exec, "pickle-2", "builtins.exec"),
    ],
)
def test_checkpoint_that_would_run_a_command_is_refused(
    capsys, tmp_path, data, function, how, name
):
    """Refused in our words, never with torch's advice to load it with weights_only=False."""

    def live(marker: Path) -> Reduces:
        command = f"touch {marker}"
        if function is subprocess.call:
            return Reduces(function, command.split())
        if function in (builtins.eval, builtins.exec):
            return Reduces(function, f"open({str(marker)!r}, 'w').close()")
        return Reduces(function, command)

    # The payload is live: an unsafe load of a copy, outside tmp_path, runs the command.
    probe = tmp_path.parent / f"{tmp_path.name}-probe"
    probe.mkdir()
    pickle.loads(pickle.dumps(live(probe / "pwned"), protocol=2))
    assert (probe / "pwned").exists()
    shutil.rmtree(probe)

    marker = tmp_path / "pwned"
    payload = live(marker)
    path = tmp_path / "model.pt"
    if how == "torch.save":
        torch.save({"extra": payload, **_segnet_state()}, path)
    else:
        path.write_bytes(pickle.dumps({"extra": payload}, protocol=int(how.split("-")[1])))
    line = predict(
        capsys, tmp_path, data, path, f"refused: loading it would run Python code ({name}); "
    )
    assert "weights_only" not in line and "\x1b" not in line and "trust" not in line
    assert not marker.exists()


# ------------------------------------------------------------------ class count


def test_checkpoint_of_another_class_count_on_a_split(capsys, tmp_path, data):
    """A network of 5 classes on a 2-class dataset would predict labels the dataset has not."""
    path = tmp_path / "model.pt"
    torch.save(model_record(build_segnet("tiny", "none", 5), "segnet", "tiny", 5), path)
    out = tmp_path / "pred"
    argv = ["predict", DEMO, f"data.root={data}", "--checkpoint", str(path), "--split", "train"]
    refuse(
        capsys, tmp_path, [*argv, "--out", str(out)], f"{path}: a network of 5 classes; ", "has 2"
    )
    assert not out.exists()


def _record(**changes) -> dict:
    record = model_record(build_segnet("tiny", "none", 2), "segnet", "tiny", 2)
    for key, value in changes.items():
        if value is None:
            del record["aepsl_model"][key]
        else:
            record["aepsl_model"][key] = value
    return record


@pytest.mark.parametrize(
    "change, message",
    [
        ({"backbone": None}, "damaged aepsl model file (backbone None is none of ours)"),
        ({"num_classes": 10**9}, "(num_classes 1000000000, but its classifier has 2 classes)"),
        ({"input_min_side": 10**7}, "(input_min_side 10000000 is not 0..8192)"),
        ({"input_size": "big"}, "(input_size 'big' is not 0..8192)"),
        ({"output_stride": 3}, "(output_stride must be 8 or 16)"),
        ({"classes": ["a"]}, "(its class names)"),
    ],
    ids=["no-backbone", "class-count", "min-side", "size-type", "stride", "names"],
)
def test_model_file_settings_are_checked_before_building(capsys, tmp_path, data, change, message):
    """Settings from the file reach allocations: a class count of 10**9, a minimum side of
    10**7 pixels (terabytes) were trusted before; a missing backbone was a KeyError."""
    path = tmp_path / "model.pt"
    torch.save(_record(**change), path)
    predict(capsys, tmp_path, data, path, message)


def test_a_model_of_nan_weights_is_refused(capsys, tmp_path, data):
    record = _record()
    record["state_dict"]["classifier.weight"].fill_(float("nan"))
    path = tmp_path / "model.pt"
    torch.save(record, path)
    predict(capsys, tmp_path, data, path, "weight tensor(s) hold NaN or infinite values")


def test_a_model_of_other_class_names_is_refused_on_a_split(capsys, tmp_path, data):
    """Same count, other names: every pixel would have been labelled with the wrong name."""
    path = tmp_path / "model.pt"
    torch.save(_record(classes=["square", "cat"]), path)
    out = tmp_path / "pred"
    argv = ["predict", DEMO, f"data.root={data}", "--checkpoint", str(path), "--split", "train"]
    refuse(
        capsys,
        tmp_path,
        [*argv, "--out", str(out)],
        "trained on other classes than the dataset's: its class 2 is 'cat', the dataset's is "
        "'disc'",
    )
