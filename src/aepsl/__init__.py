"""AE-PSL: object region mining with adversarial erasing, then prohibitive segmentation learning."""

from aepsl.version import __version__

_API = (
    "ConfigLike",
    "RunResult",
    "Segmenter",
    "StageResult",
    "UserError",
    "evaluate",
    "load_segmenter",
    "predict",
    "resolve_config",
    "run",
    "run_stage",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    """The Python API (aepsl.api) as `aepsl.run`, `aepsl.load_segmenter`, ...: imported on
    first use, so `import aepsl` (and the command's start) stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("aepsl.api"), name)
    raise AttributeError(f"module 'aepsl' has no attribute {name!r}")
