"""The ceiling (issue 25): a run's val mIoU as a fraction of the same network trained on the
ground-truth masks, printed by `aepsl run` / `aepsl train` and shown in the report; a ceiling
run on other data, unfinished or collapsed gives a one-line error or words, never a number."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import DEMO, TINY_TRAIN, overrides

from aepsl.ceiling import SCORES, Ceiling, ceiling_fractions, ceiling_line, read_ceiling
from aepsl.cli import main
from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.health import ONE_CLASS
from aepsl.layout import training_settings
from aepsl.report import write_report

TRAIN = overrides(TINY_TRAIN)


def _metrics(without: float | None, with_crf: float | None, warnings=(), pixels=100) -> dict:
    def score(miou):
        return None if miou is None else {"mIoU": miou, "images": 2, "pixels": pixels}

    return {
        "split": "val",
        "warnings": list(warnings),
        "without_crf": score(without),
        "with_crf": score(with_crf),
    }


def _ceiling(without, with_crf, collapsed=False) -> Ceiling:
    scores = _metrics(without, with_crf)
    return Ceiling(Path("sup"), {k: scores[k] for k in SCORES}, "DATA/masks", collapsed)


HEAD = "val mIoU as a fraction of the ceiling (sup, trained on DATA/masks): "


def test_fractions_are_ours_over_theirs_per_score():
    ceiling = _ceiling(0.5, 0.4)
    assert ceiling_fractions(_metrics(0.4, 0.36), ceiling) == pytest.approx(
        {"without_crf": 0.8, "with_crf": 0.9}
    )
    assert ceiling_fractions(_metrics(0.4, None), ceiling)["with_crf"] is None
    line = ceiling_line(_metrics(0.4, 0.36), ceiling)
    assert line == HEAD + "without CRF 0.80 (ceiling 0.500), with CRF 0.90 (ceiling 0.400)"


def test_no_fraction_is_printed_where_there_is_no_ceiling_to_measure_against():
    none = {"without_crf": None, "with_crf": None}
    collapsed = _ceiling(0.07, 0.07, collapsed=True)
    assert ceiling_fractions(_metrics(0.4, 0.4), collapsed) == none
    assert ceiling_line(_metrics(0.4, 0.4), collapsed) == (
        HEAD + "none; its network collapsed to one class (its health warnings)"
    )
    other_pixels = _metrics(0.4, 0.4, pixels=90)
    assert ceiling_fractions(other_pixels, _ceiling(0.5, 0.5)) == none
    assert ceiling_line(other_pixels, _ceiling(0.5, 0.5)).startswith(
        HEAD + "none; it scored other val images (2 images, 100 pixels; this run 2, 90)"
    )
    assert ceiling_line(_metrics(0.4, 0.4), _ceiling(0.0, 0.0)) == HEAD + "none; its val mIoU is 0"
    assert ceiling_line(_metrics(0.4, 0.4), _ceiling(0.5, 0.3)).endswith(
        "with CRF 1.33 (ceiling 0.300); above 1: the network trained on the masks is no ceiling "
        "at this length (train it longer, or on more images)"
    )


def _fake_run(folder: Path, root: Path, metrics: dict, complete: bool = True) -> Path:
    """A finished ceiling run's files, its settings those of DEMO on `root`."""
    (folder / "train").mkdir(parents=True)
    settings = training_settings(load_config(DEMO, [f"data.root={root}"]), "train")
    manifest = {"complete": complete, "settings": settings}
    (folder / "train" / "manifest.json").write_text(json.dumps(manifest))
    (folder / "train" / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(f"labels:\n  dir: {root / 'masks'}\n")
    return folder


def _config(root: Path, sup: Path, *more: str):
    return load_config(DEMO, [f"data.root={root}", f"ceiling={sup}", *more])


def test_read_ceiling_checks_the_run_it_names(tmp_path):
    root = tmp_path / "data"
    sup = _fake_run(tmp_path / "sup", root, _metrics(0.5, 0.6))
    assert read_ceiling(load_config(DEMO, [f"data.root={root}"])) is None
    ceiling = read_ceiling(_config(root, sup), tmp_path / "run")
    assert (ceiling.miou("without_crf"), ceiling.miou("with_crf")) == (0.5, 0.6)
    assert ceiling.labels == str(root / "masks") and not ceiling.collapsed
    # the root as written elsewhere (relative, another form) is not compared: the data is
    assert read_ceiling(_config(tmp_path / "other", sup), tmp_path / "run") is not None

    cases = {
        "no such folder": _config(root, tmp_path / "nowhere"),
        "differs from this run in data.val_split": _config(root, sup, "data.val_split=test"),
        "differs from this run in model.seg_output_stride": _config(
            root, sup, "model.seg_output_stride=16"
        ),
    }
    for fragment, config in cases.items():
        with pytest.raises(UserError, match=fragment):
            read_ceiling(config, tmp_path / "run")
    with pytest.raises(UserError, match=r"this run's own folder.*ceiling=null"):
        read_ceiling(_config(root, sup), sup)
    unfinished = _fake_run(tmp_path / "unfinished", root, _metrics(0.5, 0.6), complete=False)
    with pytest.raises(UserError, match="did not finish"):
        read_ceiling(_config(root, unfinished), tmp_path / "run")
    (unfinished / "train" / "metrics.json").write_text("{")
    with pytest.raises(UserError, match="damaged"):
        read_ceiling(_config(root, unfinished), tmp_path / "run")
    collapsed = _fake_run(tmp_path / "collapsed", root, _metrics(0.1, 0.1, [f"x: {ONE_CLASS}"]))
    assert read_ceiling(_config(root, collapsed), tmp_path / "run").collapsed
    hostile = _fake_run(tmp_path / "hostile", root, _metrics(0.5, 0.6))
    metrics = _metrics(0.5, 0.6) | {"warnings": [3, None]}
    metrics["with_crf"]["mIoU"] = "0.6"
    (hostile / "train" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="with_crf mIoU is not a number"):
        read_ceiling(_config(root, hostile), tmp_path / "run")
    metrics["with_crf"]["mIoU"] = 0.6
    (hostile / "train" / "metrics.json").write_text(json.dumps(metrics))
    assert not read_ceiling(_config(root, hostile), tmp_path / "run").collapsed
    old = _fake_run(tmp_path / "old", root, _metrics(0.5, 0.6))
    (old / "train" / "manifest.json").write_text(json.dumps({"complete": True}))
    with pytest.raises(UserError, match="records no settings"):
        read_ceiling(_config(root, old), tmp_path / "run")


def test_run_prints_and_reports_the_fraction_of_the_ceiling(folder_dataset, tmp_path, capsys):
    theirs = tmp_path / "theirs"  # a stand-in for pseudo labels: the masks themselves
    shutil.copytree(folder_dataset / "masks", theirs)
    sup = tmp_path / "sup"
    common = [DEMO, f"data.root={folder_dataset}", *TRAIN]
    masks = f"labels.dir={folder_dataset / 'masks'}"
    assert main(["train", *common, masks, "--out", str(sup)]) == 0
    capsys.readouterr()
    # four iterations leave the network collapsed; the fraction is given for a healthy one
    sup_metrics = sup / "train" / "metrics.json"
    sup_metrics.write_text(json.dumps(json.loads(sup_metrics.read_text()) | {"warnings": []}))
    out = tmp_path / "run"
    args = [*common, f"labels.dir={theirs}", f"ceiling={sup}", "--out", str(out)]
    assert main(["run", *args]) == 0
    printed = capsys.readouterr().out
    ours = json.loads((out / "train" / "metrics.json").read_text())
    theirs_metrics = json.loads((sup / "train" / "metrics.json").read_text())
    fraction = ours["without_crf"]["mIoU"] / theirs_metrics["without_crf"]["mIoU"]
    expected = f"val mIoU as a fraction of the ceiling ({sup}, trained on "
    expected += f"{folder_dataset / 'masks'}): without CRF {fraction:.2f} "
    expected += f"(ceiling {theirs_metrics['without_crf']['mIoU']:.3f})"
    assert expected in printed
    assert expected in (out / "report.html").read_text()
    config = load_config(DEMO, [f"data.root={folder_dataset}", f"ceiling={sup}"])
    sup_metrics.write_text(json.dumps(theirs_metrics | {"warnings": [f"x: {ONE_CLASS}"]}))
    write_report(config, out)
    assert "none; its network collapsed to one class" in (out / "report.html").read_text()
    # a ceiling folder that went away: the report says so in words, the run refuses at once
    shutil.rmtree(sup)
    write_report(config, out)
    assert "no such folder" in (out / "report.html").read_text()
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip().startswith(f"aepsl train: error: ceiling: {sup}")
