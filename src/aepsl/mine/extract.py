"""CAMs and regions of an erasing step: each training image's CAMs (with the earlier steps'
regions erased, as its classifier saw it), thresholded into the step's regions, optionally
saved; step 1's regions from CAMs made elsewhere; the union over the steps used.

Each process writes the files of its share of the images (disjoint); every rank's are there
after the closing barrier.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from aepsl.config import Config
from aepsl.data.datasets import load_image
from aepsl.external import image_cams, write_irn_cam
from aepsl.io import atomic_path, read_index_png, write_index_png, write_png
from aepsl.labelmap import colourise
from aepsl.layout import MineStep, RunLayout
from aepsl.mine.cam import max_normalise, union_label_maps, upsample_relu
from aepsl.mine.context import MineContext
from aepsl.mine.data import ErasedImages, collate_list
from aepsl.models.classifier import CamClassifier
from aepsl.regions import cams_to_regions
from aepsl.runtime import autocast, barrier, is_main, loader_workers, rank, to_device, world_size


def same_size_batches(loader: Iterable[list], limit: int) -> Iterator[list]:
    """Group a list-collated loader's items (image first) into stacks of equal image size."""
    pending: dict[tuple[int, ...], list] = defaultdict(list)
    for items in loader:
        for item in items:
            shape = tuple(item[0].shape)
            pending[shape].append(item)
            if len(pending[shape]) == limit:
                yield pending.pop(shape)
    yield from pending.values()


def erased_loader(dataset: ErasedImages, config: Config) -> DataLoader:
    """Whole images (no crop), in order, as lists for same_size_batches."""
    return DataLoader(
        dataset,
        batch_size=config.mine.batch_size,
        collate_fn=collate_list,
        num_workers=loader_workers(config),
    )


def _class_map_passes(
    model: CamClassifier, images: torch.Tensor, config: Config, device: torch.device
) -> list[tuple[torch.Tensor, bool]]:
    """Raw class maps of one pass per scale (and flip), each with whether its input was
    flipped. At the scale the classifier learnt objects at (mine.cam_size=train): sqrt(h x w)
    equal to the training crop's side, then each of mine.cam_scales."""
    size = images.shape[-2:]
    images = to_device(images, config, device)
    base = 1.0
    if config.mine.cam_size == "train":
        base = config.data.image_size / math.sqrt(size[0] * size[1])
    passes = []
    for scale in config.mine.cam_scales:
        factor = base * scale
        scaled = (
            images
            if factor == 1
            else F.interpolate(images, scale_factor=factor, mode="bilinear", align_corners=False)
        )
        variants = [scaled, scaled.flip(-1)] if config.mine.cam_flip else [scaled]
        for k, variant in enumerate(variants):
            with autocast(config, device):
                passes.append((model.class_maps(variant), k == 1))
    return passes


def _summed(passes: list[tuple[torch.Tensor, bool]], size: tuple[int, int]) -> torch.Tensor:
    """The passes' ReLU'd maps at `size`, flipped ones flipped back, summed, max-normalised."""
    total = None
    for maps, flipped in passes:
        maps = upsample_relu(maps, size)
        maps = maps.flip(-1) if flipped else maps
        total = maps if total is None else total + maps
    return max_normalise(total).cpu()


@torch.no_grad()
def compute_cams(
    model: CamClassifier, images: torch.Tensor, config: Config, device: torch.device
) -> torch.Tensor:
    """Max-normalised CAMs (N, C, H, W) of all classes from one pass per scale (and flip)."""
    return _summed(_class_map_passes(model, images, config, device), images.shape[-2:])


def compute_cams_of(
    model: CamClassifier, images: list[torch.Tensor], config: Config, device: torch.device
) -> list[torch.Tensor]:
    """compute_cams of (3, H, W) images of any sizes, one batch per size; (C, H, W) each, in
    the order given."""
    items = [(image, row) for row, image in enumerate(images)]
    cams: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for group in same_size_batches([items], len(items)):
        batch = compute_cams(model, torch.stack([image for image, _ in group]), config, device)
        for (_, row), cam in zip(group, batch, strict=True):
            cams[row] = cam
    return cams


@torch.no_grad()
def compute_cams_strided(
    model: CamClassifier, images: torch.Tensor, config: Config, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """compute_cams' maps, and the same passes at the network's output stride s, (N, C,
    ceil(H / s), ceil(W / s)): each pass's ReLU'd maps resized to that size, summed,
    max-normalised (IRN's `cam`, there at stride 4)."""
    size = images.shape[-2:]
    stride = getattr(getattr(model, "module", model), "output_stride", 8)
    small = (-(-size[0] // stride), -(-size[1] // stride))
    passes = _class_map_passes(model, images, config, device)
    return _summed(passes, size), _summed(passes, small)


def extract_regions(ctx: MineContext, step: MineStep, model: CamClassifier) -> None:
    """Write the step's regions (and CAMs when config.keeps_cams()) of this rank's share of the
    images not done yet."""
    config = ctx.config
    todo = [s for s in ctx.train[rank() :: world_size()] if not step.region(s.id).is_file()]
    if todo:
        model.eval()
        dataset = ErasedImages(todo, ctx.data.num_classes, ctx.erased_before(step), ctx.fill)
        vis_ids = {s.id for s in ctx.train[: config.mine.visualise]}
        irn = config.keeps_cams() and config.mine.cam_format == "irn"
        bar = tqdm(
            total=len(todo),
            desc=f"step {step.number} CAMs",
            unit="img",
            dynamic_ncols=True,
            disable=not is_main(),
        )
        for group in same_size_batches(erased_loader(dataset, config), config.mine.batch_size):
            images = torch.stack([item[0] for item in group])
            if irn:
                cams, coarse = compute_cams_strided(model, images, config, ctx.device)
            else:
                cams = compute_cams(model, images, config, ctx.device)
            for row, ((image, _, index), cam) in enumerate(zip(group, cams, strict=True)):
                sample = todo[index]
                keys = list(sample.labels)
                own = cam[[k - 1 for k in keys]]
                mode, threshold = config.mine.threshold_mode, config.mine.threshold
                labels = cams_to_regions(own, keys, mode, threshold).numpy()
                if irn:
                    strided_own = coarse[row][[k - 1 for k in keys]].numpy()
                    write_irn_cam(step.cam(sample.id, "irn"), keys, strided_own, own.numpy())
                elif config.keeps_cams():
                    keys_array = np.array(keys, np.uint8)
                    _save_npz(step.cam(sample.id), keys_array, own.numpy().astype(np.float16))
                if sample.id in vis_ids:
                    write_png(step.vis / f"{sample.id}.png", _visual(image, own, labels))
                write_index_png(step.region(sample.id), labels)  # last: marks done
            bar.update(len(group))
        bar.close()
    barrier()


def external_regions(ctx: MineContext, step: MineStep) -> None:
    """Step 1 from CAMs made elsewhere (mine.step1_cams): each image's classes' CAMs,
    thresholded as our own are, written as the step's regions (this rank's share)."""
    config = ctx.config
    folder = config.mine.step1_cams
    vis_ids = {s.id for s in ctx.train[: config.mine.visualise]}
    todo = [s for s in ctx.train[rank() :: world_size()] if not step.region(s.id).is_file()]
    for sample in tqdm(todo, desc="step 1 regions", unit="img", disable=not is_main()):
        image = load_image(sample)
        own = torch.from_numpy(image_cams(folder, sample, ctx.data.num_classes, image.shape[:2]))
        keys = list(sample.labels)
        mode, threshold = config.mine.threshold_mode, config.mine.threshold
        labels = cams_to_regions(own, keys, mode, threshold).numpy()
        if sample.id in vis_ids:
            tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            write_png(step.vis / f"{sample.id}.png", _visual(tensor, own, labels))
        write_index_png(step.region(sample.id), labels)  # last: marks done
    barrier()


def _save_npz(path: Path, keys: np.ndarray, cams: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, keys=keys, cams=cams)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _visual(image: torch.Tensor, cams: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Erased image | max CAM over the image's classes as a heat map | mined regions."""
    rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    heat = cams.amax(0).numpy() if len(cams) else np.zeros(labels.shape, np.float32)
    heat_rgb = np.stack([heat, 1 - np.abs(2 * heat - 1), 1 - heat], axis=-1)
    heat_rgb = (0.5 * rgb + 0.5 * 255 * heat_rgb).astype(np.uint8)
    colours = colourise(labels)
    overlay = np.where(labels[..., None] > 0, (0.4 * rgb + 0.6 * colours), rgb).astype(np.uint8)
    return np.concatenate([rgb, heat_rgb, overlay], axis=1)


def union_of_steps(run: RunLayout, image_id: str, steps: list[int]) -> np.ndarray:
    """The union label map of an image's regions over the given steps of the run."""
    union = None
    for step in steps:
        regions = torch.from_numpy(read_index_png(run.step(step).region(image_id)))
        union = regions if union is None else union_label_maps(union, regions)
    return union.numpy()


def write_union(ctx: MineContext, steps: list[int]) -> None:
    """mine/regions: the union of `steps`' regions, this rank's share of the images."""
    mine = ctx.train[rank() :: world_size()]  # disjoint files per rank
    for sample in tqdm(
        mine, desc="union", unit="img", dynamic_ncols=True, leave=False, disable=not is_main()
    ):
        write_index_png(ctx.run.union_region(sample.id), union_of_steps(ctx.run, sample.id, steps))
    barrier()  # every rank's union maps written
