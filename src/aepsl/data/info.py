"""`aepsl data-info`: what a dataset holds, per split and class, and whether its files decode."""

from __future__ import annotations

from aepsl.config import Config
from aepsl.data.datasets import image_size, load_dataset, validate
from aepsl.io import pixel_limit


def data_info(config: Config, check: bool = False) -> None:
    """Print the dataset's classes, skipped images, per-split counts (images, masks, saliency
    maps, images of each class) and image sizes; `check`: decode every image and mask."""
    with pixel_limit(config.data.max_pixels):
        data = load_dataset(config.data)
        print(f"dataset: {data.root} ({config.data.format}), {data.num_classes} classes")
        for reason, count in data.skipped.items():
            print(f"skipped: {count} image(s) with {reason}")
        names = ["images", "masks", "saliency", *data.classes]
        print(f"{'split':<12}" + "".join(f"{n[:10]:>11}" for n in names))
        for split, samples in data.splits.items():
            counts = [
                len(samples),
                sum(s.mask is not None for s in samples),
                sum(s.saliency is not None for s in samples),
            ] + [sum(k + 1 in s.labels for s in samples) for k in range(data.num_classes)]
            print(f"{split:<12}" + "".join(f"{c:>11}" for c in counts))
            if samples:
                sizes = [image_size(s.image) for s in samples[:200]]
                heights, widths = zip(*sizes, strict=True)
                print(
                    f"{'':<12}image size (first {len(sizes)}): "
                    f"height {min(heights)}-{max(heights)}, width {min(widths)}-{max(widths)}"
                )
            if check:
                validate(data, split)
                print(f"{'':<12}all images and masks decode and agree in size")
