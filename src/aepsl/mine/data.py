"""Images as the classifier of erasing step t sees them: earlier steps' regions filled with the
dataset's mean pixel on the fly (erased copies are never written to disk).

Training crops are seeded per sample by (epoch seed, index), so they do not depend on the
order samples are drawn in, the number of DataLoader workers, or how many processes share the
batch: one process and N data-parallel ones see the same crop of every image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import v2

from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import read_index_png
from aepsl.mine.cam import fill_erased


def mean_pixel(samples: list[Sample], limit: int = 500) -> list[float]:
    """The mean RGB pixel (0..255) of up to `limit` evenly spaced training images."""
    step = max(1, len(samples) // limit)
    total = np.zeros(3)
    count = 0
    for sample in samples[::step]:
        image = load_image(sample).reshape(-1, 3)
        total += image.sum(0)
        count += len(image)
    return [round(float(v), 3) for v in total / max(count, 1)]


def erase_mask(image_id: str, region_dirs: list[Path], shape: tuple[int, int]) -> torch.Tensor:
    """Pixels mined (any class, conflicts included) by the steps whose regions are in `dirs`."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for folder in region_dirs:
        path = folder / f"{image_id}.png"
        regions = read_index_png(path)
        if regions.shape != shape:
            raise UserError(f"{path}: region map size differs from its image")
        mask |= torch.from_numpy(regions != 0)
    return mask


class ErasedImages(TorchDataset):
    """(image in [0, 1], multi-hot labels, index) with earlier steps' regions erased.

    With `crop` set, images are randomly resized-cropped to `crop` x `crop` and flipped
    (training), the randomness seeded by (`seed` + epoch, index); without it they are returned
    whole (CAM extraction, evaluation).
    """

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        region_dirs: list[Path],
        fill: list[float],
        crop: int | None = None,
        seed: int = 0,
    ) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.region_dirs = region_dirs
        self.fill = torch.tensor(fill).round().to(torch.uint8)
        self.crop = crop
        self.seed = seed
        self.epoch = 0
        augment = (
            [
                v2.RandomResizedCrop(crop, scale=(0.5, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
            if crop
            else []
        )
        self.transform = v2.Compose(
            [
                *augment,
                v2.ToDtype(torch.float32, scale=True),  # [0, 1]: the network normalises
            ]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.samples[index]
        image = torch.from_numpy(load_image(sample)).permute(2, 0, 1).contiguous()
        if self.region_dirs:
            image = fill_erased(
                image, erase_mask(sample.id, self.region_dirs, image.shape[1:]), self.fill
            )
        target = torch.zeros(self.num_classes)
        target[[k - 1 for k in sample.labels]] = 1.0
        image = v2.functional.to_image(image)
        if not self.crop:
            return self.transform(image), target, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed + self.epoch, index)) % 2**63)
            return self.transform(image), target, index


def collate_list(batch: list) -> list:
    """Keep variable-size images as a list; the caller groups equal sizes into batches."""
    return batch
