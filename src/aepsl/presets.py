"""The presets shipped inside the package (`aepsl/configs/*.yaml`), by name: every command that
takes a config takes a bare preset name too (`aepsl run own_data ...`)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import yaml

from aepsl.config import Config, load_config
from aepsl.errors import UserError

PRESETS = Path(str(files("aepsl") / "configs"))


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of preset `name`; a one-line error listing the presets when there is none."""
    path = PRESETS / f"{name}.yaml"
    if name not in preset_names():
        raise UserError(f"{name}: no such preset (presets: {', '.join(preset_names())})")
    return path


def resolve_config_path(given: str | os.PathLike | None) -> Path | None:
    """A config argument as a file: an existing path as it is (with a one-line note when it is
    also a preset's name), else the preset of that name, else a one-line error."""
    if given is None:
        return None
    text = str(given)
    is_preset = text in preset_names()
    if Path(text).is_file():
        if is_preset:
            print(f"note: {text} is a file here and a preset's name; using the file")
        return Path(text)
    if is_preset:
        return preset_path(text)
    hint = f" and no preset of that name (presets: {', '.join(preset_names())})"
    raise UserError(f"{text}: config file not found{hint if os.sep not in text else ''}")


def describe(name: str) -> str:
    """One line: the preset's name, what it is for (its first sentence), backbone, and where
    its lengths come from."""
    path = preset_path(name)
    comment = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# ").strip())
    purpose = " ".join(comment).split(". ")[0].rstrip(".")
    config = load_config(path)
    return f"{name:<11} {purpose}. Backbone {config.model.backbone}; {_lengths(config)}."


def _lengths(config: Config) -> str:
    train = config.train
    if train.epochs is not None:
        segment = f"train {train.epochs:g} epochs (scales with the data)"
    else:
        segment = f"train {train.iterations} iterations (fixed)"
    floor = (
        f", at least {config.mine.min_positives} positives a class"
        if config.mine.min_positives
        else ""
    )
    return f"mine {config.mine.epochs} epochs a step{floor}, {segment}"


def preset_text(name: str) -> str:
    """The preset file as it is, comments included, to copy and edit."""
    text = preset_path(name).read_text(encoding="utf-8")
    yaml.safe_load(text)  # shipped presets parse; a broken install says so here
    return text
