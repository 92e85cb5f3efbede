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

from aepsl.errors import UserError
from aepsl.io import load_checkpoint

SETTINGS_KEY = "aepsl_model"


def model_record(
    net: nn.Module, kind: str, backbone: str, num_classes: int, **more: str
) -> dict[str, Any]:
    """What to save for a trained network: its settings (`more` ones too, e.g. a classifier's
    cam_head) and its state dict."""
    settings = {
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
