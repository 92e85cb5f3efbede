"""Device, precision and seeding shared by every stage that trains or infers."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from aepsl.config import Config
from aepsl.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(config: Config) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; set device=cpu or auto")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def check_precision(config: Config, device: torch.device) -> None:
    if config.precision == "fp16" and device.type != "cuda":
        raise UserError("precision=fp16 needs CUDA; use bf16 or fp32 on the CPU")


@contextlib.contextmanager
def autocast(config: Config, device: torch.device) -> Iterator[None]:
    """Mixed precision for the forward pass as `config.precision` says (fp32: none)."""
    if config.precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=DTYPES[config.precision]):
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(model: torch.nn.Module, config: Config, device: torch.device) -> torch.nn.Module:
    """Move to `device`, in channels-last layout when set (faster convolutions, esp. bf16)."""
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(images: torch.Tensor, config: Config, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if config.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
