"""Every CPU stage at VOC scale (issue 29): seconds per image on one core for the CPU work of
each stage, at VOC's size (500 x 375 JPEGs, 20 classes + background, 1-3 objects), checked for
linear cost (n against 4n images), and the wall time each would take over VOC's 10,582
training / 1,449 val images on N cores.

The work is timed with the stages' own functions, one torch thread, one process, and nothing
of a network: on a GPU the networks' part runs there, and this is what the machine's cores must
do beside it.

- mine loader: one training item of the erasing step 3 classifier (`ErasedImages` with two
  earlier steps' regions, crop data.image_size = 321): JPEG decode, erasing fill, random
  resized crop, flip. Paid images x epochs x steps times.
- psl loader: one training crop (`PseudoLabelled`, crop 321, scale 0.7-1.3): JPEG and label
  decode, rescale, crop. Paid iterations x batch times.
- CAM post: an image's CAMs (its classes, at image size, as they come back from the device)
  to regions (`cams_to_regions`) and the region PNG written; x 3 steps.
- labels (dir): region and saliency PNGs read, fused, the pseudo label written (the VOC
  preset: saliency.source=dir).
- labels (builtin): the same with the built-in saliency computed (own data's presets).
- seed sweep: `seed_confusions` over 19 thresholds for 3 steps and the union, mask read.
- val predict: JPEG decode, argmax of the (21, H, W) probabilities, PNG written.
- CRF torch / CRF pydensecrf: one image's dense CRF (VOC's parameters, 10 iterations).

    python benchmarks/bench_voc_scale.py                 # n = 8 and 32 images
    python benchmarks/bench_voc_scale.py --n 4 --cores 2,16 --only "labels (dir),CRF torch"
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import describe_machine, make_config
from bench_crf import PHOTOS, photographs, realistic_softmax
from PIL import Image

from aepsl.data.datasets import load_image, load_mask
from aepsl.data.types import Sample
from aepsl.evaluation import SEED_THRESHOLDS, seed_confusions
from aepsl.inference.crf import crf_labels, crf_labels_torch, pydensecrf_installed
from aepsl.inference.crf_params import CrfParams
from aepsl.io import read_gray_png, read_index_png, write_index_png, write_png
from aepsl.labels.fusion import background_from_saliency, fuse_pseudo_label
from aepsl.labels.saliency import mbd_saliency
from aepsl.mine.data import ErasedImages
from aepsl.psl.data import PseudoLabelled
from aepsl.regions import cams_to_regions

WIDTH, HEIGHT, CLASSES = 500, 375, 20
TRAIN_IMAGES, VAL_IMAGES, SCORED_IMAGES = 10_582, 1_449, 1_464
NOISE = 2.0  # bench_crf.py's default
VOC = Path(__file__).parent.parent / "configs" / "voc_vgg16.yaml"


def make_voc_like(root: Path, n: int, seed: int = 0) -> list[Sample]:
    """n JPEGs of 500 x 375 (quality 90, as VOC's): scikit-image's photographs with 1-3 elliptic
    objects of random classes tinted in, with their masks, two steps of regions and a saliency
    map each."""
    rng = np.random.default_rng(seed)
    photos = photographs(2 * len(PHOTOS), WIDTH, HEIGHT)  # the four photographs, and mirrored
    for folder in ("images", "masks", "step1", "step2", "saliency", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    samples = []
    for i in range(n):
        image = photos[i % len(photos)]
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        classes = rng.choice(np.arange(1, CLASSES + 1), rng.integers(1, 4), replace=False)
        for k in classes:
            cy, cx = rng.uniform(60, HEIGHT - 60), rng.uniform(60, WIDTH - 60)
            ry, rx = rng.uniform(30, 120, 2)
            mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = k
        image = image.copy()
        image[mask > 0] = image[mask > 0] // 2 + (mask[mask > 0, None] * 12).astype(np.uint8)
        image_id = f"voc_{i:05d}"
        Image.fromarray(image).save(root / "images" / f"{image_id}.jpg", quality=90)
        write_index_png(root / "masks" / f"{image_id}.png", mask)
        for step, shrink in (("step1", 0), ("step2", 1)):  # regions: parts of the objects
            regions = np.where((mask > 0) & ((yy + xx * shrink) % 3 == 0), mask, 0)
            write_index_png(root / step / f"{image_id}.png", regions.astype(np.uint8))
        saliency = np.where(mask > 0, 230, 20).astype(np.uint8)
        write_png(root / "saliency" / f"{image_id}.png", saliency)
        write_index_png(root / "labels" / f"{image_id}.png", mask)
        present = tuple(sorted(int(k) for k in np.unique(mask) if k))
        image_file, mask_file = (
            root / "images" / f"{image_id}.jpg",
            root / "masks" / f"{image_id}.png",
        )
        samples.append(Sample(image_id, image_file, present, mask_file))
    return samples


def random_cams(sample: Sample, seed: int) -> torch.Tensor:
    """(classes of the image, H, W) CAMs in [0, 1], as they come back from the device."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(len(sample.labels), HEIGHT // 8, WIDTH // 8, generator=generator)
    return F.interpolate(coarse[None], size=(HEIGHT, WIDTH), mode="bilinear")[0]


def probabilities(image: np.ndarray, seed: int) -> np.ndarray:
    """(21, H, W) class probabilities that follow the photograph's segments (bench_crf.py's),
    as they come back from the device."""
    return realistic_softmax(image, CLASSES + 1, seed, noise=NOISE)


# A stage's work: set up (untimed) on the samples, it returns the work for image `index`.
Work = Callable[[list[Sample]], Callable[[int], object]]


def stage_work(root: Path, out: Path) -> dict[str, Work]:
    config = make_config(str(VOC), [f"data.root={root}"])
    params = CrfParams.from_config(config.crf)
    mode, threshold = config.mine.threshold_mode, config.mine.threshold
    for folder in ("cams", "saliency", "labels", "predict"):
        (out / folder).mkdir(parents=True, exist_ok=True)

    def mine_loader(samples: list[Sample]) -> Callable[[int], object]:
        regions = [root / "step1", root / "step2"]
        fill = [124.0, 116.0, 104.0]
        return ErasedImages(
            samples, CLASSES, regions, fill, crop=config.data.image_size
        ).__getitem__

    def psl_loader(samples: list[Sample]) -> Callable[[int], object]:
        t = config.train
        return PseudoLabelled(
            samples, CLASSES, root / "labels", t.crop_size, t.scale_range, 0
        ).__getitem__

    def cam_post(samples: list[Sample]) -> Callable[[int], object]:
        cams = [random_cams(s, i) for i, s in enumerate(samples)]

        def work(i: int) -> None:
            for step in range(3):
                regions = cams_to_regions(cams[i], list(samples[i].labels), mode, threshold)
                write_index_png(out / "cams" / f"{samples[i].id}_{step}.png", regions.numpy())

        return work

    def labels(builtin: bool) -> Work:
        def setup(samples: list[Sample]) -> Callable[[int], object]:
            def work(i: int) -> None:
                sample = samples[i]
                regions = read_index_png(root / "step1" / f"{sample.id}.png")
                saliency_file = root / "saliency" / f"{sample.id}.png"
                if builtin:  # computed, cached as 8 bits and read back, as the stage does
                    saliency = mbd_saliency(load_image(sample), max_side=config.saliency.max_side)
                    saliency_file = out / "saliency" / f"{sample.id}.png"
                    write_png(saliency_file, (saliency * 255 + 0.5).astype(np.uint8))
                background = background_from_saliency(
                    read_gray_png(saliency_file), config.labels.bg_threshold
                )
                label = fuse_pseudo_label(regions, background, config.labels.low_saliency)
                write_index_png(out / "labels" / f"{sample.id}.png", label)

            return work

        return setup

    def seed_sweep(samples: list[Sample]) -> Callable[[int], object]:
        cams = [[random_cams(s, 3 * i + step) for step in range(3)] for i, s in enumerate(samples)]

        def work(i: int) -> None:
            keys = list(samples[i].labels)
            target = load_mask(samples[i], (HEIGHT, WIDTH), CLASSES)
            for own in [*cams[i], torch.stack(cams[i]).amax(0)]:  # 3 steps and the union
                seed_confusions(own.numpy(), keys, target, SEED_THRESHOLDS, CLASSES)

        return work

    def with_probs(refine: Callable[[np.ndarray, np.ndarray], object] | None) -> Work:
        def setup(samples: list[Sample]) -> Callable[[int], object]:
            probs = [probabilities(load_image(s), i) for i, s in enumerate(samples)]

            def work(i: int) -> None:
                image = load_image(samples[i])
                if refine is None:  # val predict: argmax written
                    label = probs[i].argmax(0).astype(np.uint8)
                    write_index_png(out / "predict" / f"{samples[i].id}.png", label)
                else:
                    refine(image, probs[i])

            return work

        return setup

    work: dict[str, Work] = {
        "mine loader": mine_loader,
        "psl loader": psl_loader,
        "CAM post": cam_post,
        "labels (dir)": labels(builtin=False),
        "labels (builtin)": labels(builtin=True),
        "seed sweep": seed_sweep,
        "val predict": with_probs(None),
        "CRF torch": with_probs(lambda im, pr: crf_labels_torch([im], [pr], params=params)),
    }
    if pydensecrf_installed():
        work["CRF pydensecrf"] = with_probs(lambda im, pr: crf_labels((im, pr), params))
    return work


# Per stage: how many times VOC's recipe pays it (voc_vgg16: 15 epochs x 3 steps of 10,582
# images; 6,000 iterations of 20 crops; seed mIoU on VOC train, 1,464 images; 1,449 val) and
# how aepsl spreads it over C cores with its defaults on one GPU: loader workers C - 1
# (data.num_workers auto), labels and the CRF on the CPU over C processes (labels.workers,
# crf.workers auto), the rest in the GPU's process. The torch CRF runs on the GPU there; its
# row is the CPU-only machine's.
COUNTS = {
    "mine loader": (15 * 3 * TRAIN_IMAGES, lambda c: max(1, c - 1)),
    "psl loader": (6000 * 20, lambda c: max(1, c - 1)),
    "CAM post": (TRAIN_IMAGES, lambda c: 1),
    "labels (dir)": (TRAIN_IMAGES, lambda c: c),
    "labels (builtin)": (TRAIN_IMAGES, lambda c: c),
    "seed sweep": (SCORED_IMAGES, lambda c: 1),
    "val predict": (VAL_IMAGES, lambda c: 1),
    "CRF torch": (VAL_IMAGES, lambda c: c),
    "CRF pydensecrf": (VAL_IMAGES, lambda c: c),
}


def time_stage(work: Work, samples: list[Sample]) -> float:
    """Seconds of `work` per image over `samples`, after one untimed image."""
    run = work(samples)
    run(0)
    start = time.perf_counter()
    for index in range(len(samples)):
        run(index)
    return (time.perf_counter() - start) / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=8, help="images of the small run (the large: 4n)")
    parser.add_argument("--cores", default="2,16", help="core counts to estimate wall time for")
    parser.add_argument("--only", help="comma-separated stage names (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = [int(c) for c in args.cores.split(",")]
    print(
        f"{describe_machine()}; one process, one thread; images {WIDTH}x{HEIGHT}, {CLASSES} classes"
    )
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_voc_like(Path(tmp) / "data", 4 * args.n)
        work = stage_work(Path(tmp) / "data", Path(tmp) / "out")
        names = [n for n in work if not args.only or n in args.only.split(",")]
        head = f"{'stage':<18}{'s/image':>9}{'4n/n':>6}{'times':>10}{'1 core':>9}"
        head += "".join(f"{f'{c} cores':>10}" for c in cores)
        print(head)
        for name in names:
            small = time_stage(work[name], samples[: args.n])
            large = time_stage(work[name], samples)
            count, spread = COUNTS[name]
            row = f"{name:<18}{large:>9.4f}{large * 4 / small:>6.2f}{count:>10,}"
            row += f"{minutes(large * count):>9}"
            row += "".join(f"{minutes(large * count / spread(c)):>10}" for c in cores)
            print(row, flush=True)
    print("s/image: one core; 4n/n: the cost of 4n images over n's, x 4 (linear: 4.00)")
    print("times: how often VOC's recipe pays it; wall minutes on 1 core and on C cores beside one")
    print("GPU as aepsl spreads it (loaders over C - 1 workers; labels and the CPU CRF over C")
    print("processes; CAM post, seed sweep and val predict in the GPU's process)")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


if __name__ == "__main__":
    main()
