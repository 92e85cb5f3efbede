"""`aepsl synth --real`: photographs with exact masks, deterministic, valid as a dataset."""

import numpy as np
import pytest
from PIL import Image

from aepsl.cli import main
from aepsl.data.real import FASHION_MNIST_DIR, REAL_CLASSES, load_fashion, make_real
from aepsl.errors import UserError
from aepsl.io import read_index_png

pytestmark = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it when it can)",
)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return make_real(tmp_path_factory.mktemp("real") / "data", n=12, size=96, seed=3)


def test_masks_agree_with_labels_and_images(real):
    classes = (real / "classes.txt").read_text().split()
    assert classes == [REAL_CLASSES[k] for k in sorted(REAL_CLASSES)]
    rows = (real / "labels.csv").read_text().splitlines()
    assert rows[0] == "image,labels" and len(rows) == 13
    for row in rows[1:]:
        image_id, names = row.split(",")
        image = np.asarray(Image.open(real / "images" / f"{image_id}.png"))
        mask = read_index_png(real / "masks" / f"{image_id}.png")
        assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
        present = {classes[k - 1] for k in np.unique(mask) if k}
        assert present == set(names.split()) and present


def test_mask_is_exactly_the_pasted_pixels(tmp_path):
    """Objects pasted on a flat background: the pixels that changed are the mask's."""
    import aepsl.data.real as real_module

    articles, labels = load_fashion()
    flat = [np.full((200, 200, 3), 7, np.uint8)]
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = real_module.render_real_scene(rng, 96, articles, labels, flat)
        changed = np.abs(scene.image.astype(int) - 7).max(axis=2) > 20  # 6 noise sigmas
        assert np.array_equal(changed, scene.mask > 0)


def test_deterministic_for_a_seed(real, tmp_path):
    again = make_real(tmp_path / "again", n=12, size=96, seed=3)
    for path in sorted(real.rglob("*.*")):
        assert path.read_bytes() == (again / path.relative_to(real)).read_bytes(), path


def test_cli_writes_it_and_data_info_checks_it(tmp_path, capsys):
    root = tmp_path / "cli"
    assert main(["synth", str(root), "--real", "--n", "8", "--size", "64"]) == 0
    assert main(["data-info", f"data.root={root}", "--check"]) == 0
    out = capsys.readouterr().out
    assert "all images and masks decode and agree in size" in out


def test_missing_fashion_mnist_names_the_fix(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        make_real(tmp_path / "x", n=8, source=tmp_path / "nowhere")


def test_demo_on_real_pixels_runs_every_stage(tmp_path, capsys):
    from aepsl.demo import run_demo

    tiny = [
        "mine.epochs=1",
        "mine.steps=2",
        "data.image_size=64",
        "train.iterations=4",
        "train.crop_size=64",
        "train.batch_size=4",
        "precision=fp32",
        "crf.workers=1",
    ]
    result = run_demo(tmp_path / "demo", tiny, n=12, size=64, real=True, tiny=True)
    assert (tmp_path / "demo" / "data_real" / "classes.txt").read_text().startswith("trouser")
    assert len(result["mine"]["steps"]) == 2
    assert 0 <= result["val"]["without_crf"]["mIoU"] <= 1
    assert "segmentation, val mIoU without CRF" in capsys.readouterr().out
