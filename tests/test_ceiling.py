"""The ceiling (issue 25): a run's val mIoU as a fraction of the same network trained on the
ground-truth masks, printed by `aepsl run` / `aepsl train` and shown in the report; a ceiling
run on other data, unfinished or collapsed gives a one-line error or words, never a number."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import DEMO, TINY_TRAIN, overrides

from aepsl.ceiling import Ceiling, ceiling_fractions, ceiling_line, read_ceiling
from aepsl.cli import main
from aepsl.config import load_config
from aepsl.errors import UserError
from aepsl.health import ONE_CLASS
from aepsl.report import write_report

TRAIN = overrides(TINY_TRAIN)


def _metrics(without: float | None, with_crf: float | None, warnings=()) -> dict:
    return {
        "split": "val",
        "warnings": list(warnings),
        "without_crf": None if without is None else {"mIoU": without},
        "with_crf": None if with_crf is None else {"mIoU": with_crf},
    }


def test_fractions_are_ours_over_theirs_per_score():
    ceiling = Ceiling(Path("sup"), {"without_crf": 0.5, "with_crf": 0.4}, "DATA/masks", False)
    assert ceiling_fractions(_metrics(0.4, 0.36), ceiling) == pytest.approx(
        {"without_crf": 0.8, "with_crf": 0.9}
    )
    assert ceiling_fractions(_metrics(0.4, None), ceiling)["with_crf"] is None
    line = ceiling_line(_metrics(0.4, 0.36), ceiling)
    assert line == (
        "of the ceiling (sup, trained on DATA/masks): val mIoU without crf 0.80 of 0.500, "
        "with crf 0.90 of 0.400"
    )


def test_a_collapsed_ceiling_gives_words_not_a_fraction():
    ceiling = Ceiling(Path("sup"), {"without_crf": 0.07, "with_crf": 0.07}, "masks", True)
    assert ceiling_fractions(_metrics(0.4, 0.4), ceiling) == {"without_crf": None, "with_crf": None}
    line = ceiling_line(_metrics(0.4, 0.4), ceiling)
    assert "collapsed" in line and "0." not in line.replace("sup", "")


def _fake_run(folder: Path, root: Path, metrics: dict, complete: bool = True) -> Path:
    (folder / "train").mkdir(parents=True)
    settings = {"data": {"root": str(root), "val_split": "val"}}
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
    assert ceiling.miou == {"without_crf": 0.5, "with_crf": 0.6}
    assert ceiling.labels == str(root / "masks") and not ceiling.collapsed

    cases = {
        "no such folder": _config(root, tmp_path / "nowhere"),
        "was trained on data": _config(tmp_path / "other", sup),
        "was scored on split 'val', this run on 'test'": _config(root, sup, "data.val_split=test"),
    }
    for fragment, config in cases.items():
        with pytest.raises(UserError, match=fragment):
            read_ceiling(config, tmp_path / "run")
    with pytest.raises(UserError, match="this run's own folder"):
        read_ceiling(_config(root, sup), sup)
    unfinished = _fake_run(tmp_path / "unfinished", root, _metrics(0.5, 0.6), complete=False)
    with pytest.raises(UserError, match="did not finish"):
        read_ceiling(_config(root, unfinished), tmp_path / "run")
    (unfinished / "train" / "metrics.json").write_text("{")
    with pytest.raises(UserError, match="damaged"):
        read_ceiling(_config(root, unfinished), tmp_path / "run")
    collapsed = _fake_run(tmp_path / "collapsed", root, _metrics(0.1, 0.1, [f"x: {ONE_CLASS}"]))
    assert read_ceiling(_config(root, collapsed), tmp_path / "run").collapsed


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
    expected = f"of the ceiling ({sup}, trained on {folder_dataset / 'masks'}): val mIoU "
    expected += f"without crf {fraction:.2f} of {theirs_metrics['without_crf']['mIoU']:.3f}"
    assert expected in printed
    assert expected in (out / "report.html").read_text()
    config = load_config(DEMO, [f"data.root={folder_dataset}", f"ceiling={sup}"])
    sup_metrics.write_text(json.dumps(theirs_metrics | {"warnings": [f"x: {ONE_CLASS}"]}))
    write_report(config, out)
    assert "its network collapsed to one class" in (out / "report.html").read_text()
    # a ceiling folder that went away: the report says so in words, the run refuses at once
    shutil.rmtree(sup)
    write_report(config, out)
    assert "no such folder" in (out / "report.html").read_text()
    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip().startswith(f"aepsl train: error: ceiling: {sup}")
