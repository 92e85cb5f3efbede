"""A dataset of real pixels with exact masks, buildable offline: photographed products pasted
onto crops of real photographs.

Objects are Fashion-MNIST product photos (Zalando's article images, 28 x 28 grey, on a black
background, from Debian's `dataset-fashion-mnist`), so an object's mask is its pixels above a
low grey level after enlarging (holes filled), and exactly those pixels are pasted. Each is
tinted with a random colour that does not depend on its class (so colour gives nothing away)
and pasted, fully opaque within its mask, onto a random crop of one of scikit-image's bundled
photographs and textures. The mask is therefore
the ground truth pixel for pixel. Unlike `synth`, nothing here is built to make CAMs partial:
this is the "does it work on photographs" demo, not the "why erasing matters" one.
"""

from __future__ import annotations

import gzip
import numbers
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from aepsl.data.synth import Scene, check_counts, object_count, write_scenes
from aepsl.errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_IMAGES = "t10k-images-idx3-ubyte.gz"
FASHION_LABELS = "t10k-labels-idx1-ubyte.gz"
# Fashion-MNIST label -> our class name: five articles with clearly different shapes.
REAL_CLASSES: dict[int, str] = {1: "trouser", 3: "dress", 7: "sneaker", 8: "bag", 9: "boot"}
# All ten articles, for `classes` other than 5: the five above first, then the rest (tops and a
# sandal, whose shapes are close to each other and to the five). `classes` = K takes the first K.
FASHION_CLASSES: dict[int, str] = {
    **REAL_CLASSES,
    0: "tshirt",
    2: "pullover",
    4: "coat",
    5: "sandal",
    6: "shirt",
}


def real_class_ids(classes: int = len(REAL_CLASSES)) -> list[int]:
    """The Fashion-MNIST labels of a `classes`-class dataset, in class order (sorted labels)."""
    return sorted(list(FASHION_CLASSES)[:classes])


# scikit-image's bundled photographs (colour) and textures (grey), all shipped in its wheel.
BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "grass",
    "gravel",
    "brick",
    "moon",
)
_OBJECT_SIDE = (0.38, 0.6)  # enlarged object side / image side
_SUPPORT_LEVEL = 24  # grey level (0..255) above which an enlarged article pixel is object
_MIN_VISIBLE = 0.5  # an earlier object keeps at least this fraction of its pixels
_PLACEMENT_TRIES = 12


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        dims = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)
    except (OSError, ValueError, IndexError, EOFError) as exc:
        raise UserError(f"{path}: not a readable idx file ({exc})") from None


def load_fashion(
    source: Path | None = None, keep_labels: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28, labels N) of the Fashion-MNIST test set, only `keep_labels`
    (default REAL_CLASSES) kept."""
    folder = Path(source) if source else FASHION_MNIST_DIR
    paths = [folder / FASHION_IMAGES, folder / FASHION_LABELS]
    for path in paths:
        if not path.is_file() and not path.with_suffix("").is_file():
            raise UserError(
                f"{path}: Fashion-MNIST not found; `apt-get install dataset-fashion-mnist` "
                "(Debian/Ubuntu) or pass the folder holding the idx files"
            )
    images, labels = (_read_idx(p if p.is_file() else p.with_suffix("")) for p in paths)
    keep = np.isin(labels, list(REAL_CLASSES) if keep_labels is None else keep_labels)
    return images[keep], labels[keep]


def _backgrounds() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in BACKGROUNDS:
        photo = getattr(skimage.data, name)()
        photos.append(np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo)
    return photos


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A random square crop of `photo` (at least half its short side), resized to `size`."""
    height, width = photo.shape[:2]
    side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side, :3])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.float64)


def _object(
    rng: np.random.Generator, article: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(side x side x 3 tinted pixels, side x side mask): the enlarged article, exact mask."""
    grey = np.asarray(Image.fromarray(article).resize((side, side), Image.BICUBIC), np.float64)
    # The support of the enlarged photo (its black surround dropped), holes filled: the pasted
    # pixels are exactly these, so the mask is exact by construction.
    mask = ndimage.binary_fill_holes(grey > _SUPPORT_LEVEL)
    tint = rng.uniform(0.35, 1.0, 3)
    pixels = 30 + np.clip(grey, 0, 255)[..., None] * tint * 0.85
    return pixels, mask


def render_real_scene(
    rng: np.random.Generator,
    size: int,
    articles: np.ndarray,
    article_labels: np.ndarray,
    photos: list[np.ndarray],
    class_ids: list[int] | None = None,
    objects: int | None = None,
) -> Scene:
    """One to three (see `object_count`) articles of distinct classes over a crop of a real
    photograph; `class_ids`: the Fashion-MNIST labels used, class k is `class_ids[k - 1]`
    (default: REAL_CLASSES)."""
    image = _crop(rng, photos[int(rng.integers(len(photos)))], size)
    mask = np.zeros((size, size), np.uint8)
    ids = sorted(REAL_CLASSES) if class_ids is None else list(class_ids)
    count = object_count(rng, len(ids), objects)
    placed: list[tuple[int, int]] = []  # (class index, pixels when pasted)
    for fashion_label in rng.choice(ids, size=count, replace=False):
        label = ids.index(int(fashion_label)) + 1
        pool = np.flatnonzero(article_labels == fashion_label)
        pixels, shape = _object(
            rng,
            articles[int(rng.choice(pool))],
            int(size * rng.uniform(*_OBJECT_SIDE)),
        )
        side = shape.shape[0]
        for _ in range(_PLACEMENT_TRIES):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
            region = np.zeros_like(mask, bool)
            region[top : top + side, left : left + side] = shape
            if all(((mask == k) & ~region).sum() >= _MIN_VISIBLE * n for k, n in placed):
                break
        else:
            continue
        image[top : top + side, left : left + side][shape] = pixels[shape]
        mask[region] = label
        placed.append((label, int(region.sum())))
    image += rng.normal(0.0, 3.0, image.shape)
    return Scene(np.clip(image + 0.5, 0, 255).astype(np.uint8), mask, ())


def make_real(
    out: str | Path,
    n: int = 240,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.25,
    source: Path | None = None,
    classes: int = len(REAL_CLASSES),
    objects: int | None = None,
) -> Path:
    """Write `n` real-pixel composites of `size` px to `out` in the `folder` format (layout as
    `make_synth`). Deterministic for a seed. `source`: folder of the Fashion-MNIST idx files.
    `classes` (2..10): the first `classes` articles of FASHION_CLASSES; `objects`: at most this
    many per image, 1..objects equally likely (None: one to three, as the demo)."""
    if not isinstance(n, numbers.Integral) or n < 4:
        raise UserError(f"real-pixel dataset: n must be an integer >= 4, got {n!r}")
    if not isinstance(size, numbers.Integral) or size < 64:
        raise UserError(f"real-pixel dataset: size must be an integer >= 64, got {size!r}")
    check_counts("real-pixel dataset", classes, len(FASHION_CLASSES), objects)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    ids = real_class_ids(classes)
    articles, article_labels = load_fashion(source, ids)
    photos = _backgrounds()
    rng = np.random.default_rng(seed)
    scenes = (
        render_real_scene(rng, size, articles, article_labels, photos, ids, objects)
        for _ in range(n)
    )
    names = tuple(FASHION_CLASSES[k] for k in ids)
    return write_scenes(root, "real", names, scenes, n, rng, val_fraction)
