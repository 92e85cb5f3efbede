"""Training pairs for the segmentation network: image, pseudo label, image-level labels.

Augmentation (DeepLab convention): random rescale, random crop, padded with the mean colour
(image) and 255 (label), horizontal flip. Each sample's randomness is seeded by
(seed, epoch, index), so a resumed run draws exactly the crops an uninterrupted one would, and
N data-parallel processes exactly the crops of one process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import read_index_png
from aepsl.labelmap import IGNORE
from aepsl.models.backbones import IMAGENET_MEAN

MEAN_RGB = [round(255 * m) for m in IMAGENET_MEAN]


class PseudoLabelled(TorchDataset):
    """(crop in [0, 1], label crop, multi-hot image labels) for sample `index` of an epoch."""

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        labels_dir: Path,
        crop: int,
        scale_range: tuple[float, float],
        seed: int,
    ) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.labels_dir = labels_dir
        self.seed = seed
        self.epoch = 0
        fill = {tv_tensors.Image: MEAN_RGB, tv_tensors.Mask: IGNORE}
        self.transform = v2.Compose(
            [
                # Zooming about the centre on a fixed canvas = rescale, then crop/pad to size.
                v2.RandomAffine(degrees=0, scale=scale_range, fill=fill),
                v2.RandomCrop(crop, pad_if_needed=True, fill=fill),
                v2.RandomHorizontalFlip(),
            ]
        )
        self.to_float = v2.ToDtype(torch.float32, scale=True)  # [0, 1]: the network normalises

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = load_image(sample)
        path = self.labels_dir / f"{sample.id}.png"
        if not path.is_file():
            raise UserError(f"{path}: pseudo label missing; run `aepsl labels` with this --out")
        label = read_index_png(path)
        if label.shape != image.shape[:2]:
            raise UserError(f"{path}: pseudo label size differs from its image")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            image_t, label_t = self.transform(
                tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
                tv_tensors.Mask(torch.from_numpy(label)),
            )
        target = torch.zeros(self.num_classes)
        target[[k - 1 for k in sample.labels]] = 1.0
        return (
            self.to_float(image_t).as_subclass(torch.Tensor),
            label_t.as_subclass(torch.Tensor).long(),
            target,
        )
