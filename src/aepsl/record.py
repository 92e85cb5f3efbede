"""What is saved beside every output: the resolved config, the versions of the software that
produced it and the precision `auto` resolved to on this machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import yaml

from aepsl.config import Config


def resolved_config(config: Config) -> dict[str, Any]:
    """The config as written beside outputs, with the versions and the precision that produced
    them."""
    import numpy
    import torch
    import torchvision

    from aepsl.runtime import crf_workers, effective_precision, loader_workers
    from aepsl.version import __version__

    return {
        **config.model_dump(mode="json"),
        "versions": {
            "aepsl": __version__,
            "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "numpy": str(numpy.__version__),
            "python": platform.python_version(),
        },
        "runtime": {
            "precision": effective_precision(config),
            "num_workers": loader_workers(config),
            "crf_workers": crf_workers(config),
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
    }


def save_config(config: Config, out: str | os.PathLike, name: str = "config.yaml") -> Path:
    from aepsl.io import write_text

    path = Path(out) / name
    write_text(path, yaml.safe_dump(resolved_config(config), sort_keys=False))
    return path
