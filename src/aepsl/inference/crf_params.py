"""The dense CRF's parameters as one frozen record, built from the `crf` config section: the
defaults (DeepLab-LargeFOV's) live in config.py alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # CRF worker processes unpickle this record: they import no config code
    from aepsl.config import CrfConfig


@dataclass(frozen=True)
class CrfParams:
    """Mean-field iterations and the two kernels: a Gaussian smoothness kernel (weight, xy
    width) and a bilateral appearance kernel (weight, xy and rgb widths)."""

    iterations: int
    bilateral_weight: float
    bilateral_xy_std: float
    bilateral_rgb_std: float
    gaussian_weight: float
    gaussian_xy_std: float

    @classmethod
    def from_config(cls, config: CrfConfig) -> CrfParams:
        return cls(**config.model_dump(include=set(cls.__dataclass_fields__)))

    @classmethod
    def defaults(cls, **changes: float) -> CrfParams:
        """The config's defaults, with `changes` (e.g. iterations=5)."""
        from aepsl.config import CrfConfig

        return cls.from_config(CrfConfig(**changes))
