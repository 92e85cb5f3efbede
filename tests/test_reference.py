"""docs/configuration.md is generated from config.py's field descriptions (aepsl.reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from aepsl.config import Config
from aepsl.reference import config_reference, main

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_committed_reference_is_current():
    committed = DOC.read_text(encoding="utf-8").splitlines()
    generated = config_reference().splitlines()
    if committed != generated:
        where = next(
            (i for i, (a, b) in enumerate(zip(committed, generated, strict=False)) if a != b),
            min(len(committed), len(generated)),
        )
        pytest.fail(
            f"docs/configuration.md is out of date with src/aepsl/config.py (first difference "
            f"at line {where + 1}): run `make docs` and commit the file"
        )


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")


def test_every_key_and_section_has_a_description():
    missing = [key for key, field in _fields(Config) if not (field.description or "").strip()]
    assert not missing, f"config fields without description=: {', '.join(missing)}"


def test_every_key_has_a_row():
    text = config_reference()
    keys = [
        key
        for key, field in _fields(Config)
        if not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel)
    ]
    assert [key for key in keys if f"| `{key}` |" not in text] == []


def test_types_bounds_and_defaults_come_from_the_fields():
    text = config_reference()
    assert "| `mine.threshold` | float, (0, 1) | `0.8` |" in text
    assert "| `mine.threshold_mode` | `relative`, `quantile` | `relative` |" in text
    assert "| `mine.cam_scales` | list of float, at least 1, each in (0, 4] | `[1.0]` |" in text
    assert "| `train.epochs` | float or `null`, > 0 | `null` |" in text
    assert "| `train.scale_range` | [float, float], each in (0, 4] | `[0.7, 1.3]` |" in text
    assert "| `data.num_workers` | int or `auto`, [0, 256] | `auto` |" in text


def test_cells_stay_markdown():
    # a bare <id> would be an HTML tag; a | would split the cell
    for line in config_reference().splitlines():
        if line.startswith("| `"):
            assert line.count(" | ") == 3, line
            outside_code = line.split("`")[::2]
            assert not any("<" in part for part in outside_code), line


def test_write(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    main(["--write", str(out)])
    assert out.read_text(encoding="utf-8") == config_reference()
    main([])
    assert capsys.readouterr().out == config_reference()
