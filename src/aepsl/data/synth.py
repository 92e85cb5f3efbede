"""A deterministic synthetic dataset in the `folder` format, built so weak supervision is hard.

AE-PSL rests on one observation: a classifier trained on image-level labels relies on the most
discriminative part of an object, so its class map covers only that part, and erasing the part
makes the next classifier find the rest. A CPU demo needs images where this happens by
construction rather than by luck, so every object here is:

- a small *head* (about 8% of the object's pixels): a disc in a saturated colour that only its
  class uses, by far the easiest cue;
- a large *body* (about 92%) that is much less distinctive: two colour families and two shape
  families are shared by all classes; the class is written into the body only subtly (stripe
  period, or a plaid, at low contrast with per-object jitter and noise), so a classifier *can*
  recognise a body once the head is erased but prefers the head while it is there.

Backgrounds are cluttered (low-frequency colour, patches with body-like textures of random
parameters, small discs in colours no head uses) so that neither texture nor "small bright
disc" alone gives the class away. Bodies are brighter and more saturated than the background on
average and objects keep clear of the image border, so boundary-connectivity saliency can find
the background. Labels are read back from the final mask, so they always agree with it.
"""

from __future__ import annotations

import colorsys
import csv
import io
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aepsl.errors import UserError
from aepsl.io import write_index_png, write_png, write_text

SYNTH_CLASSES: tuple[str, ...] = ("ant", "bee", "cow", "elk", "fox")

_WARM, _COOL = 0.07, 0.52  # body hue families (fraction of the colour wheel)


@dataclass(frozen=True)
class _Look:
    """How one class is drawn: a unique head colour and a body cue shared in part with others."""

    head_rgb: tuple[int, int, int]
    body_hue: float
    period: float  # stripe period in pixels at 128 px image side
    plaid: bool


# Each body colour family is shared (ant/bee/fox warm, cow/elk cool) and each stripe period is
# shared across families (ant/cow fine, bee/elk coarse), so only the combination names a class.
_LOOKS = (
    _Look((225, 25, 25), _WARM, 4.5, False),  # ant
    _Look((235, 215, 15), _WARM, 9.0, False),  # bee
    _Look((25, 190, 45), _COOL, 4.5, False),  # cow
    _Look((35, 65, 235), _COOL, 9.0, False),  # elk
    _Look((215, 30, 215), _WARM, 6.5, True),  # fox
)
# More classes (`classes` > 5, up to 20): further unique head colours, and body cues from the 12
# combinations of colour family, stripe period and plaid the first five leave partly unused;
# from the 13th class on, a body cue repeats, so only the head tells those classes apart.
_EXTRA_NAMES = (
    "owl", "pig", "rat", "yak", "emu", "gnu", "hen", "cat", "dog", "bat", "eel", "ape", "ram",
    "koi", "cod",
)  # fmt: skip
_EXTRA_HEADS = (
    (130, 20, 220),  # violet
    (150, 235, 20),  # lime
    (20, 120, 60),  # dark green
    (120, 10, 10),  # maroon
    (10, 20, 120),  # navy
    (240, 120, 170),  # pink
    (110, 80, 10),  # brown
    (20, 140, 240),  # sky blue
    (200, 150, 255),  # lavender
    (255, 90, 90),  # salmon
    (100, 10, 100),  # purple
    (20, 220, 130),  # spring green
    (180, 180, 20),  # olive
    (10, 10, 10),  # black
    (90, 90, 200),  # periwinkle
)
_BODY_CUES: tuple[tuple[float, float, bool], ...] = (
    (_COOL, 6.5, True),
    (_WARM, 6.5, False),
    (_COOL, 6.5, False),
    (_WARM, 4.5, True),
    (_COOL, 4.5, True),
    (_WARM, 9.0, True),
    (_COOL, 9.0, True),
    *((look.body_hue, look.period, look.plaid) for look in _LOOKS),
)
MAX_SYNTH_CLASSES = len(_LOOKS) + len(_EXTRA_NAMES)


def synth_classes(classes: int = len(SYNTH_CLASSES)) -> tuple[str, ...]:
    """The class names of a `classes`-class synthetic dataset (the first five: SYNTH_CLASSES)."""
    return (SYNTH_CLASSES + _EXTRA_NAMES)[:classes]


def _looks(classes: int) -> tuple[_Look, ...]:
    extra = tuple(
        _Look(head, *_BODY_CUES[j % len(_BODY_CUES)])
        for j, head in enumerate(_EXTRA_HEADS[: max(0, classes - len(_LOOKS))])
    )
    return (_LOOKS + extra)[:classes]


def object_count(rng: np.random.Generator, classes: int, objects: int | None) -> int:
    """How many objects (of distinct classes) an image gets: `objects` None, the demo's mix of
    1 (40%), 2 (35%) or 3 (25%), at most `classes`; else 1..`objects`, equally likely."""
    if objects is None:
        return min(int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])), classes)
    return int(rng.integers(1, objects + 1))


def check_counts(what: str, classes: int, max_classes: int, objects: int | None) -> None:
    """One-line errors for a bad number of classes or of objects per image."""
    if not isinstance(classes, numbers.Integral) or not 2 <= classes <= max_classes:
        raise UserError(f"{what}: classes must be an integer in 2..{max_classes}, got {classes!r}")
    if objects is not None and (
        not isinstance(objects, numbers.Integral) or not 1 <= objects <= classes
    ):
        raise UserError(
            f"{what}: objects per image must be an integer in 1..classes ({classes}), "
            f"got {objects!r}"
        )


# Background discs the size of a head, in colours no head uses, so a classifier cannot learn
# "small saturated disc" as a shortcut for "object".
_DISTRACTOR_RGB = ((20, 205, 205), (250, 145, 10), (235, 235, 235))

_HEAD_FRACTION = (0.07, 0.10)  # head pixels / body pixels
_BODY_RADIUS = (0.15, 0.35)  # semi-major axis / image side
_MIN_VISIBLE = 0.4  # each object keeps at least this fraction of its pixels when occluded
_PLACEMENT_TRIES = 12


@dataclass(frozen=True)
class SynthObject:
    """One object's parts before occlusion (boolean HxW maps; head pixels are not body pixels)."""

    label: int  # 1..C
    body: np.ndarray
    head: np.ndarray


@dataclass(frozen=True)
class Scene:
    """One generated image with its exact ground truth and the objects drawn into it."""

    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW uint8, 0 background, k class k
    objects: tuple[SynthObject, ...]

    @property
    def labels(self) -> tuple[int, ...]:
        """Classes with visible pixels: a fully hidden object does not count."""
        return tuple(int(v) for v in np.unique(self.mask) if v)


def _rgb(hue: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val)) * 255.0


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small kxkx3 grid to size x size: smooth colour variation."""
    t = np.linspace(0.0, grid.shape[0] - 1.0, size)
    i = np.minimum(t.astype(int), grid.shape[0] - 2)
    w = (t - i)[:, None, None]
    rows = grid[i] * (1 - w) + grid[i + 1] * w
    w = w.transpose(1, 0, 2)
    return rows[:, i] * (1 - w) + rows[:, i + 1] * w


def _stripes(u: np.ndarray, v: np.ndarray, period: float, plaid: bool, phase: float) -> np.ndarray:
    """A texture in [-1, 1]: bands across the u axis, or a plaid of bands across both axes."""
    wave = np.sin(2 * np.pi * u / period + phase)
    if plaid:
        wave = 0.5 * (wave + np.sin(2 * np.pi * v / period + phase))
    return wave


def _textured(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    rgb: np.ndarray,
    period: float,
    plaid: bool,
) -> np.ndarray:
    """Colour `rgb` modulated by a low-contrast texture plus per-region noise (HxWx3 float)."""
    amplitude = rng.uniform(0.08, 0.14)
    wave = _stripes(u, v, period, plaid, rng.uniform(0, 2 * np.pi))
    noise = rng.normal(0.0, rng.uniform(3.0, 8.0), (*u.shape, 3))
    return rgb * (1 + amplitude * wave)[..., None] + noise


def _frame(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a frame centred at (cy, cx) and rotated by theta: (along, across)."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _background(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: float
) -> np.ndarray:
    """Dull low-frequency colour, then body-like textured patches and head-sized discs."""
    k = int(rng.integers(3, 6))
    grid = np.array(
        [_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.6)) for _ in range(k * k)]
    ).reshape(k, k, 3)
    size = yy.shape[0]
    image = _upsample(grid, size)
    for _ in range(int(rng.integers(2, 5))):
        # Patches may run off the border: they are clutter, and touching it keeps them
        # background for boundary-connectivity saliency.
        cy, cx = rng.uniform(0, size, 2)
        ha, hb = rng.uniform(0.06, 0.18, 2) * size
        u, v = _frame(yy, xx, cy, cx, rng.uniform(0, np.pi))
        if rng.random() < 0.5:
            inside = (u / ha) ** 2 + (v / hb) ** 2 <= 1
        else:
            inside = (np.abs(u) <= ha) & (np.abs(v) <= hb)
        family = _WARM if rng.random() < 0.5 else _COOL
        rgb = _rgb(
            family + rng.uniform(-0.05, 0.05), rng.uniform(0.2, 0.5), rng.uniform(0.45, 0.75)
        )
        period = rng.uniform(4.0, 10.5) * scale
        texture = _textured(rng, u, v, rgb, period, bool(rng.random() < 0.3))
        image[inside] = texture[inside]
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(0.02, 0.05) * size
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        rgb = np.array(_DISTRACTOR_RGB[int(rng.integers(len(_DISTRACTOR_RGB)))], float)
        image[inside] = rgb + rng.normal(0.0, 8.0, 3)
    return image


def _place_object(
    rng: np.random.Generator, size: int, label: int, yy: np.ndarray, xx: np.ndarray
) -> tuple[SynthObject, np.ndarray, np.ndarray]:
    """Random geometry for one object kept clear of the border; returns it and its (u, v) frame.

    The body is an ellipse or a rounded rectangle (a superellipse) for every class, so shape
    says nothing about the class; the head sits on one end of the body's long axis.
    """
    a = rng.uniform(*_BODY_RADIUS) * size
    b = a * rng.uniform(0.55, 0.85)
    power = 2.0 if rng.random() < 0.5 else 4.0
    theta = rng.uniform(0, 2 * np.pi)
    head_fraction = rng.uniform(*_HEAD_FRACTION)
    # Body area of a superellipse |u/a|^p + |v/b|^p <= 1 is a*b times this constant.
    body_area = a * b * (np.pi if power == 2.0 else 3.7081)
    h = np.sqrt(head_fraction * body_area / np.pi)
    reach = a + 0.3 * h  # head centre's distance from the body centre
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    # Conservative half-extents: the superellipse lies in its rotated a x b bounding box.
    ext_x = max(a * c + b * s, reach * c + h)
    ext_y = max(a * s + b * c, reach * s + h)
    lo_x, hi_x = ext_x + 1, size - 1 - ext_x
    lo_y, hi_y = ext_y + 1, size - 1 - ext_y
    cx = rng.uniform(lo_x, hi_x) if lo_x < hi_x else size / 2
    cy = rng.uniform(lo_y, hi_y) if lo_y < hi_y else size / 2
    u, v = _frame(yy, xx, cy, cx, theta)
    body = np.abs(u / a) ** power + np.abs(v / b) ** power <= 1
    head = (u - reach) ** 2 + v**2 <= h**2
    return SynthObject(label, body & ~head, head), u, v


def render_scene(
    rng: np.random.Generator,
    size: int,
    classes: int = len(SYNTH_CLASSES),
    objects: int | None = None,
) -> Scene:
    """Draw one image of one to three (see `object_count`) objects of distinct classes out of
    `classes` over a cluttered background.

    Later objects are drawn on top. A placement that would leave an earlier object less than
    `_MIN_VISIBLE` visible is retried, and the object is dropped if no try fits, so no label
    rests on a sliver of pixels; the label set is in any case read from the final mask.
    """
    # Texture periods follow the image size but stop shrinking below 2/3 of the 128 px ones, so
    # the finest stripes keep a period of 3 px and the fine/coarse cue survives small images.
    scale = max(size / 128, 2 / 3)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    image = _background(rng, yy, xx, scale)
    mask = np.zeros((size, size), np.uint8)
    looks = _looks(classes)
    count = object_count(rng, classes, objects)
    drawn: list[SynthObject] = []
    for label in rng.choice(classes, size=count, replace=False) + 1:
        for _ in range(_PLACEMENT_TRIES):
            obj, u, v = _place_object(rng, size, int(label), yy, xx)
            region = obj.body | obj.head
            if all(
                ((mask == prev.label) & ~region).sum()
                >= _MIN_VISIBLE * (prev.body | prev.head).sum()
                for prev in drawn
            ):
                break
        else:
            continue
        look = looks[obj.label - 1]
        hue = look.body_hue + rng.uniform(-0.03, 0.03)
        rgb = _rgb(hue, rng.uniform(0.35, 0.6), rng.uniform(0.7, 0.9))
        period = look.period * scale * rng.uniform(0.9, 1.1)
        image[obj.body] = _textured(rng, u, v, rgb, period, look.plaid)[obj.body]
        head_rgb = np.array(look.head_rgb, float) + rng.normal(0.0, 8.0, 3)
        image[obj.head] = head_rgb + rng.normal(0.0, 4.0, (int(obj.head.sum()), 3))
        mask[region] = obj.label
        drawn.append(obj)
    image += rng.normal(0.0, 4.0, image.shape)
    return Scene(np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, tuple(drawn))


def make_synth(
    out: str | Path,
    n: int = 240,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.25,
    classes: int = len(SYNTH_CLASSES),
    objects: int | None = None,
) -> Path:
    """Write `n` synthetic images of `size` x `size` px to `out` in the `folder` format.

    `classes` (2..20): how many classes (SYNTH_CLASSES, then more; see `synth_classes`);
    `objects`: at most this many objects per image, 1..objects equally likely (None: the demo's
    mix of one to three). The defaults give the demo's data, byte for byte.

    Layout: images/<id>.png, masks/<id>.png (0 background, k class k), classes.txt,
    labels.csv (image,labels), splits/train.txt and splits/val.txt. The same arguments give
    byte-identical files. Returns the dataset root.
    """
    if not isinstance(n, numbers.Integral) or n < 4:
        raise UserError(f"synthetic dataset: n must be an integer >= 4, got {n!r}")
    if not isinstance(size, numbers.Integral) or size < 48:
        raise UserError(f"synthetic dataset: size must be an integer >= 48, got {size!r}")
    if not 0 < val_fraction < 1:
        raise UserError(f"synthetic dataset: val_fraction must be in (0, 1), got {val_fraction!r}")
    check_counts("synthetic dataset", classes, MAX_SYNTH_CLASSES, objects)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    rng = np.random.default_rng(seed)
    scenes = (render_scene(rng, size, classes, objects) for _ in range(n))
    return write_scenes(root, "synth", synth_classes(classes), scenes, n, rng, val_fraction)


def write_scenes(
    root: Path,
    prefix: str,
    classes: tuple[str, ...],
    scenes: Iterable[Scene],
    n: int,
    rng: np.random.Generator,
    val_fraction: float,
) -> Path:
    """Write `n` scenes as a `folder` dataset (images, masks, classes.txt, labels.csv from each
    mask, train/val splits drawn with `rng`); ids are `<prefix>_00000`... Returns `root`."""
    ids = [f"{prefix}_{i:05d}" for i in range(n)]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["image", "labels"])
    for image_id, scene in zip(ids, scenes, strict=True):
        write_png(root / "images" / f"{image_id}.png", scene.image)
        write_index_png(root / "masks" / f"{image_id}.png", scene.mask)
        writer.writerow([image_id, " ".join(classes[k - 1] for k in scene.labels)])
    write_text(root / "classes.txt", "".join(f"{name}\n" for name in classes))
    write_text(root / "labels.csv", table.getvalue())
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = set(rng.permutation(n)[:n_val].tolist())
    splits = {"train": [i for i in range(n) if i not in val], "val": sorted(val)}
    for name, members in splits.items():
        write_text(root / "splits" / f"{name}.txt", "".join(f"{ids[i]}\n" for i in members))
    return root
