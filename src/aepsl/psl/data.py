"""Training pairs for the segmentation network: image, pseudo label, image-level labels, and
which pixels of the crop are real.

Augmentation (DeepLab convention): random rescale of the whole image (and its label, nearest),
then a random crop of train.crop_size, padded with the mean colour (image) and 255 (label)
where the rescaled image is smaller than the crop, then a horizontal flip. Rescaling comes
first, so zooming in never clips the image: the crop picks a window of the enlarged image. The
valid mask marks the pixels that are the image's, not padding: the loss ignores padding in
both cross-entropies (psl/loss.py). Each sample's randomness is seeded by (seed, epoch, index),
so a resumed run draws exactly the crops an uninterrupted one would, and N data-parallel
processes exactly the crops of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from aepsl.data.datasets import Sample, load_image
from aepsl.errors import UserError
from aepsl.io import read_index_png
from aepsl.labelmap import IGNORE
from aepsl.models.normalisation import IMAGENET_MEAN
from aepsl.models.segnet import input_scale

MEAN_RGB = [round(255 * m) for m in IMAGENET_MEAN]


@dataclass(frozen=True)
class Crop:
    """One sample's augmentation: the rescaled size, the crop window's top-left corner in the
    rescaled image (negative, or a window reaching past the image: padding), and the flip."""

    height: int
    width: int
    top: int
    left: int
    flip: bool


def draw_crop(
    generator: torch.Generator,
    height: int,
    width: int,
    crop: int,
    scale_range: tuple[float, float],
    base: float = 1.0,
) -> Crop:
    """A random scale in `scale_range`, times `base` (the rescaled image is round(scale *
    height) x round(scale * width)), a crop position uniform over the windows that lie inside
    the image (image larger than the crop) or hold all of it (smaller), and a fair coin for
    the flip."""
    low, high = scale_range
    scale = base * (low + (high - low) * torch.rand((), generator=generator).item())
    size = [max(1, round(scale * height)), max(1, round(scale * width))]
    corner = []
    for side in size:
        first, last = min(0, side - crop), max(0, side - crop)
        corner.append(int(torch.randint(first, last + 1, (), generator=generator)))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return Crop(size[0], size[1], corner[0], corner[1], flip)


def rescale(
    image: torch.Tensor, label: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) uint8 image (bilinear, antialiased) and (H, W) label (nearest) resized to
    height x width, all of the image kept."""
    if tuple(image.shape[-2:]) == (height, width):
        return image, label
    image = TF.resize(image, [height, width], InterpolationMode.BILINEAR, antialias=True)
    label = TF.resize(label[None], [height, width], InterpolationMode.NEAREST_EXACT)[0]
    return image, label


def crop_with_padding(
    image: torch.Tensor, label: torch.Tensor, crop: int, top: int, left: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crop x crop window at (top, left) of the image and label; pixels outside the image
    are padding (MEAN_RGB, IGNORE, and False in the returned valid mask)."""
    height, width = label.shape
    out_image = torch.tensor(MEAN_RGB, dtype=image.dtype).view(3, 1, 1).repeat(1, crop, crop)
    out_label = torch.full((crop, crop), IGNORE, dtype=label.dtype)
    valid = torch.zeros(crop, crop, dtype=torch.bool)
    y0, y1 = max(top, 0), min(top + crop, height)
    x0, x1 = max(left, 0), min(left + crop, width)
    if y1 > y0 and x1 > x0:
        target = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        out_image[(slice(None), *target)] = image[:, y0:y1, x0:x1]
        out_label[target] = label[y0:y1, x0:x1]
        valid[target] = True
    return out_image, out_label, valid


class PseudoLabelled(TorchDataset):
    """(crop in [0, 1], label crop, multi-hot image labels, valid mask: True on the image's
    pixels, False on padding) for sample `index` of an epoch."""

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        labels_dir: Path,
        crop: int,
        scale_range: tuple[float, float],
        seed: int,
        input_size: int = 0,
        min_side: int = 0,
    ) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.labels_dir = labels_dir
        self.seed = seed
        self.epoch = 0
        self.crop = crop
        self.scale_range = scale_range
        self.input_size = input_size  # larger images reduced to sqrt(h x w) = it (0: off)
        self.min_side = min_side  # ... then a shorter side below it enlarged to it (0: off)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(
        self, index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        image = load_image(sample)
        path = self.labels_dir / f"{sample.id}.png"
        if not path.is_file():
            raise UserError(f"{path}: pseudo label missing; run `aepsl labels` with this --out")
        label = read_index_png(path)
        if label.shape != image.shape[:2]:
            raise UserError(f"{path}: pseudo label size differs from its image")
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
        base = input_scale(*label.shape, self.input_size, self.min_side)
        crop = draw_crop(generator, *label.shape, self.crop, self.scale_range, base)
        image_t, label_t = rescale(
            torch.from_numpy(image).permute(2, 0, 1),
            torch.from_numpy(label),
            crop.height,
            crop.width,
        )
        image_t, label_t, valid = crop_with_padding(
            image_t, label_t, self.crop, crop.top, crop.left
        )
        if crop.flip:
            image_t, label_t, valid = image_t.flip(-1), label_t.flip(-1), valid.flip(-1)
        target = torch.zeros(self.num_classes)
        target[[k - 1 for k in sample.labels]] = 1.0
        return image_t.float().div(255), label_t.long(), target, valid  # the network normalises
