"""OUT/report.html on a tiny real run: sections, panels, self-containment, and (when Chromium is
installed) that it renders and every embedded image loads in a real browser."""

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEMO, TINY_MINE, TINY_TRAIN, overrides
from PIL import Image

from aepsl.cli import main
from aepsl.config import load_config
from aepsl.inference.predict import crf_available, predict_report_images
from aepsl.models.segnet import load_segnet
from aepsl.report import read_scalars, svg_chart, write_report

STEPS = 3
VISUALISE = 2
# No train.checkpoint_every: the preset's, so no checkpoint before the last iteration.
TINY = overrides(
    TINY_MINE,
    TINY_TRAIN,
    "mine.epochs=2",
    f"mine.steps={STEPS}",
    f"mine.visualise={VISUALISE}",
    "train.iterations=6",
)
SECTIONS = [
    "Run",
    "Stage 1: adversarial erasing",
    "Stage 2: pseudo labels",
    "Stage 3: segmentation",
    "Training images",
    "Validation images",
]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from conftest import make_folder_dataset

    base = tmp_path_factory.mktemp("report")
    root = make_folder_dataset(base / "data", n=8)
    out = base / "run"
    overrides = [f"data.root={root}", *TINY]
    for command in ("mine", "labels", "train"):
        assert main([command, DEMO, *overrides, "--out", str(out)]) == 0
    config = load_config(DEMO, overrides)
    # What `aepsl run` does before the report: predict the training images mine drew.
    predict_report_images(config, out, load_segnet(out / "train" / "model.pt"), torch.device("cpu"))
    path = write_report(config, out)
    return out, path


def test_report_sections_and_panels(report):
    out, path = report
    assert path == out / "report.html"
    page = path.read_text()
    for heading in SECTIONS:
        assert f">{heading}</h2>" in page, heading
    assert "not run" not in page
    # Training rows: image, erased + CAM per step, union regions, saliency, pseudo label,
    # prediction, CRF prediction (when pydensecrf is there), ground truth. Val rows: image,
    # prediction, CRF prediction, ground truth.
    crf = crf_available()
    per_train = 1 + 2 * STEPS + 3 + 1 + int(crf) + 1
    per_val = 3 + 1
    assert page.count("<img") == VISUALISE * per_train + 2 * per_val
    assert page.count('class="nopanel"') == (0 if crf else VISUALISE)
    assert page.count("<svg") == 2 and page.count("<polyline") == STEPS + 4
    assert (out / "report" / "predict" / "img0.png").is_file()
    assert (out / "report" / "predict_crf" / "img1.png").is_file() == crf


def test_run_table_says_what_ran(report):
    """The lengths trained, read from the train.json files, not the config's defaults."""
    _, path = report
    page = path.read_text()
    assert "<th>erasing steps</th><td>3; 2 epochs, 2 iterations each</td>" in page
    assert "<th>segmentation training</th><td>6 iterations of 2 crops, 6 images</td>" in page


def test_report_is_self_contained(report):
    _, path = report
    page = path.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']data:image/png;base64,)""", page)
    assert "<script" not in page and "<link" not in page
    uris = DATA_URI.findall(page)
    assert len(uris) == page.count("<img")
    for uri in uris:
        image = Image.open(io.BytesIO(base64.b64decode(uri, validate=True)))
        assert image.format == "PNG"
        image.verify()


def test_missing_stages_say_not_run(tmp_path):
    config = load_config(DEMO, [f"data.root={tmp_path / 'nowhere'}"])
    page = write_report(config, tmp_path / "run").read_text()
    assert page.count("not run") >= 4
    assert "<img" not in page


def test_scalars_and_chart(report):
    out, _ = report
    mine = read_scalars(out / "mine" / "tensorboard")
    assert sorted(mine) == [f"step{t}/total" for t in range(1, STEPS + 1)]
    train = read_scalars(out / "train" / "tensorboard")
    assert sorted(train) == ["train/cls", "train/psl", "train/seg", "train/total"]
    assert [s for s, _ in train["train/total"]] == [1, 2, 3, 4, 5, 6]
    assert read_scalars(out / "absent") == {}
    chart = svg_chart({"a": [(0, 1.0)], "b": [(0, 1.0), (1, float("nan")), (2, 3.0)]}, "t")
    assert chart.count("<circle") == 1 and chart.count("<polyline") == 1


# ------------------------------------------------------------------ in a real browser


@pytest.fixture(scope="module")
def browser() -> str:
    """A headless-capable Chromium, or the test is skipped (before the run is built)."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no headless browser found ({', '.join(BROWSERS)}): report not rendered")


def _run_browser(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_report_renders_in_chromium(browser, report, tmp_path):
    _, path = report
    shot = tmp_path / "shot.png"
    result = _run_browser(
        browser,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1400,2000",
        path.resolve().as_uri(),
    )
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1400, 3)
    assert pixels.std() > 10  # text, tables, charts and pictures, not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_every_image_loads_in_chromium(browser, report, tmp_path):
    _, path = report
    page = path.read_text()
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const images = Array.from(document.images);"
        "const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;"
        "document.body.setAttribute('data-probe', `broken=${broken} total=${images.length}`);"
        "});</script>"
    )
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", probe + "</body>"))
    result = _run_browser(
        browser,
        tmp_path / "profile",
        "--virtual-time-budget=5000",
        "--dump-dom",
        checked.as_uri(),
    )
    found = re.search(r'data-probe="broken=(\d+) total=(\d+)"', result.stdout)
    assert found, (result.stdout[-500:], result.stderr[-2000:])
    broken, total = map(int, found.groups())
    assert broken == 0
    assert total == page.count("<img") > 0


def test_labels_section_names_the_salient_fill():
    from types import SimpleNamespace

    from aepsl.report.render import _labels_section

    metrics = {"saliency_source": "builtin", "bg_threshold": 0.2, "low_saliency": "mined"}
    plain = _labels_section(SimpleNamespace(labels=metrics))
    fill = {**metrics, "salient_fill": {"threshold": 0.3}}
    filled = _labels_section(SimpleNamespace(labels=fill))
    assert "filled from CAMs" not in plain
    assert "mined, unmined salient pixels filled from CAMs of at least 0.30.</p>" in filled
