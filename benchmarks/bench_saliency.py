"""Time the built-in MB+ saliency detector on photos at the training crop size.

Stage 2 computes one saliency map per training image (10,582 on PASCAL VOC train_aug), so
its cost per image decides whether the built-in detector is a practical default. Photos from
scikit-image stand in for VOC images (real textures, no download); they are resized to a
square of `--size` px, the DeepLab crop size, and cycled.

Usage: PYTHONPATH=src python benchmarks/bench_saliency.py [--size 321] [--n 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from skimage import data
from skimage.transform import resize

from aepsl.labels.saliency import mbd_saliency

PHOTOS = ("chelsea", "coffee", "astronaut")


def load_photos(size: int) -> list[np.ndarray]:
    """The scikit-image photos as size x size uint8 RGB images."""
    photos = []
    for name in PHOTOS:
        image = resize(getattr(data, name)(), (size, size), anti_aliasing=True, preserve_range=True)
        photos.append(image.round().astype(np.uint8))
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=321, help="image side in pixels")
    parser.add_argument("--n", type=int, default=50, help="number of timed images")
    parser.add_argument("--max-side", type=int, default=160, help="mbd_saliency's max_side")
    args = parser.parse_args()
    if args.size < 1 or args.n < 1:
        parser.error("--size and --n must be positive")

    photos = load_photos(args.size)
    for image in photos:  # warm-up: first calls pay for imports and allocator growth
        mbd_saliency(image, max_side=args.max_side)
    start = time.perf_counter()
    for i in range(args.n):
        mbd_saliency(photos[i % len(photos)], max_side=args.max_side)
    elapsed = time.perf_counter() - start
    print(f"images: {args.n}, max_side: {args.max_side}")
    print(f"builtin saliency: {elapsed / args.n * 1000:.1f} ms/image at {args.size} px")


if __name__ == "__main__":
    main()
