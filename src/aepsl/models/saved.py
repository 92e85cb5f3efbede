"""Trained-model files (model.pt, classifier.pt) that say what they hold.

Format: `{"aepsl_model": {...settings...}, "state_dict": {...tensors...}}`, plain data and
tensors only, so `torch.load(weights_only=True)` reads it. The settings are those that build
the network: kind ("segnet" or "cam_classifier"), backbone, output_stride, num_classes, and
a segnet's input_min_side or a classifier's cam_head. A file
of earlier versions is a bare state dict: it loads with the settings of the config, as before.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from aepsl.config import BACKBONES
from aepsl.errors import UserError
from aepsl.io import load_checkpoint

SETTINGS_KEY = "aepsl_model"


def model_record(
    net: nn.Module, kind: str, backbone: str, num_classes: int, **more: Any
) -> dict[str, Any]:
    """What to save for a trained network: its settings (`more` ones too, e.g. a classifier's
    cam_head) and its state dict."""
    settings: dict[str, Any] = {
        "kind": kind,
        "backbone": backbone,
        "output_stride": int(net.output_stride),
        "num_classes": int(num_classes),
        **more,
    }
    if kind == "segnet":  # the scale images are seen at (segnet.input_scale)
        settings["input_size"] = int(getattr(net, "input_size", 0))
        settings["input_min_side"] = int(getattr(net, "input_min_side", 0))
    return {SETTINGS_KEY: settings, "state_dict": net.state_dict()}


def read_model_file(
    path: str | os.PathLike,
) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(settings, state dict) of a model file; settings None for a bare state dict."""
    state = load_checkpoint(path)
    if SETTINGS_KEY not in state:
        return None, state
    settings, weights = state[SETTINGS_KEY], state.get("state_dict")
    if not isinstance(settings, dict) or not isinstance(weights, dict):
        raise UserError(f"{path}: damaged aepsl model file (settings or weights missing)")
    return settings, weights


def agree(path: str | os.PathLike, saved: dict[str, Any], asked: dict[str, Any]) -> None:
    """A one-line error when a setting the user gave (`asked`, e.g. from the config) differs
    from the one the file was trained with (`saved`)."""
    for key, value in asked.items():
        if key in saved and saved[key] != value:
            raise UserError(
                f"{path}: trained with {key}={saved[key]}, but the config asks for {value}; "
                "drop that setting (the file says how to build its network) or give the "
                "matching checkpoint"
            )


MAX_INPUT_SIDE = 8192  # input_size / input_min_side beyond this are no image anyone trains on


def check_segnet_file(
    path: str | os.PathLike, settings: dict[str, Any], state: dict[str, torch.Tensor]
) -> None:
    """A segmentation model file's settings, checked against what they may be and against its
    own weights before anything is built from them (a class count or input size from a
    hostile file would otherwise reach allocations of any size), and its weights finite."""
    backbone = settings.get("backbone")
    if backbone not in BACKBONES:
        raise UserError(f"{path}: damaged aepsl model file (backbone {backbone!r} is none of ours)")
    if settings.get("output_stride") not in (8, 16):
        raise UserError(f"{path}: damaged aepsl model file (output_stride must be 8 or 16)")
    weight = state.get("classifier.weight")
    classes = settings.get("num_classes")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        raise UserError(f"{path}: damaged aepsl model file (no classifier.weight)")
    if not isinstance(classes, int) or classes != weight.shape[0] - 1:
        raise UserError(
            f"{path}: damaged aepsl model file (num_classes {classes!r}, but its classifier "
            f"has {weight.shape[0] - 1} classes)"
        )
    for key in ("input_size", "input_min_side"):
        value = settings.get(key, 0)
        if not isinstance(value, int) or not 0 <= value <= MAX_INPUT_SIDE:
            raise UserError(
                f"{path}: damaged aepsl model file ({key} {value!r} is not 0..{MAX_INPUT_SIDE})"
            )
    names = settings.get("classes")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != classes
        or not all(isinstance(n, str) for n in names)
    ):
        raise UserError(f"{path}: damaged aepsl model file (its class names)")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise UserError(
            f"{path}: {len(broken)} weight tensor(s) hold NaN or infinite values (e.g. "
            f"'{broken[0]}'): the training that wrote it diverged; use an earlier checkpoint"
        )


def check_class_names(path: str | os.PathLike, saved: list[str] | None, data: list[str]) -> None:
    """A model trained on other classes than the dataset's (same count, other names or order)
    would label every pixel with the wrong name: a one-line error naming the first difference."""
    if saved is None or saved == data:
        return
    k = next(i for i, (a, b) in enumerate(zip(saved, data, strict=True)) if a != b)
    raise UserError(
        f"{path}: trained on other classes than the dataset's: its class {k + 1} is "
        f"'{saved[k]}', the dataset's is '{data[k]}'"
    )
