"""The values every part of the mine stage reads, built once per run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aepsl.config import Config
from aepsl.data.datasets import Dataset, Sample
from aepsl.layout import MineStep, RunLayout


@dataclass(frozen=True)
class MineContext:
    """Stage-wide inputs: the settings, the dataset, its training split and the images of it
    the metrics are computed on (data.score_split), the run folder, the erasing fill colour
    (the training images' mean pixel) and the device."""

    config: Config
    data: Dataset
    train: list[Sample]
    run: RunLayout
    fill: list[float]
    device: torch.device
    scored: list[Sample]
    score_split: str

    def erased_before(self, step: MineStep) -> list[Path]:
        """The region folders of the steps before `step`: what its classifier sees erased."""
        return [self.run.step(s).regions for s in range(1, step.number)]
