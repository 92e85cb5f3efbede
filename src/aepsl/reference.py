"""The configuration reference (docs/configuration.md), generated from the config's fields.

Every key's type, bounds and default come from its pydantic field in config.py, its meaning
from the field's `description=`, so the reference cannot drift from what the config accepts.

    python -m aepsl.reference                                 # print the reference
    python -m aepsl.reference --write docs/configuration.md   # what `make docs` runs

tests/test_reference.py fails when the committed docs/configuration.md differs from this output.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from aepsl.config import Config

HEADER = """\
# Configuration reference

Generated from the field descriptions in `src/aepsl/config.py` by `python -m aepsl.reference`
(`make docs`); edit the descriptions there, not this file. `tests/test_reference.py` fails when
this file is out of date.

A config is a YAML file of these keys: the top-level keys, then one mapping per section
(`data:`, `model:`, ...). A key left out takes its default; with no config file at all every key
does, which is the paper's setting. The presets in `configs/` set only the keys they change.
On the command line, `key=value` after the command sets any key, e.g. `mine.steps=4` or
`mine.cam_scales=[1.0,0.5]`; the value is read as YAML. An unknown key, or a value of the wrong
type or outside its bounds, is a one-line error naming the key.

Bounds are intervals: `(0, 1)` excludes both ends, `[0, 1)` includes 0. What the method does
with each setting: [method.md](method.md); the measurements behind the defaults:
[measurements.md](measurements.md).
"""


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _interval(constraints: list[Any]) -> str:
    """`(0, 4]`, `≥ 1`, ... from pydantic's Gt / Ge / Lt / Le metadata; "" when unbounded."""
    bound = {
        name: getattr(item, name)
        for item in constraints
        for name in ("gt", "ge", "lt", "le")
        if getattr(item, name, None) is not None
    }
    low = ("(", bound["gt"]) if "gt" in bound else ("[", bound["ge"]) if "ge" in bound else None
    high = (")", bound["lt"]) if "lt" in bound else ("]", bound["le"]) if "le" in bound else None
    if low and high:
        return f"{low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '≥'} {_number(low[1])}"
    if high:
        return f"{'<' if high[0] == ')' else '≤'} {_number(high[1])}"
    return ""


def _length(constraints: list[Any], what: str) -> str:
    least = next((c.min_length for c in constraints if hasattr(c, "min_length")), None)
    if least is None:
        return ""
    return "not empty" if least == 1 and what == "str" else f"at least {least}"


def _type(annotation: Any) -> tuple[str, list[Any]]:
    """A readable type and the bounds its elements carry (Annotated[float, Field(gt=0)])."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, _ = _type(args[0])
        bounds = [m for extra in args[1:] for m in getattr(extra, "metadata", [extra])]
        return inner, bounds
    if origin is typing.Literal:
        return ", ".join(f"`{_value(a)}`" for a in args), []
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        inner = " or ".join(kind for kind, _ in parts)
        bounds = next((b for _, b in parts if b), [])
        return (f"{inner} or `null`" if type(None) in args else inner), bounds
    if origin is list:
        inner, bounds = _type(args[0])
        return f"list of {inner}", bounds
    if origin is tuple:
        parts = [_type(a) for a in args]
        return f"[{', '.join(p[0] for p in parts)}]", parts[0][1]
    return getattr(annotation, "__name__", str(annotation)), []


def _value(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _number(value)


def _cell(text: str) -> str:
    """One table cell: on one line, `|` escaped, and `<` outside code spans written as `&lt;`
    (a bare `<id>` would be read as an HTML tag and vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _row(key: str, field: FieldInfo) -> str:
    kind, element_bounds = _type(field.annotation)
    inner = _interval(element_bounds)
    if inner and kind.startswith(("list", "[")):  # a list's or tuple's elements carry them
        inner = f"each {inner}"
    notes = [_interval(field.metadata), _length(field.metadata, kind), inner]
    kind = ", ".join([kind, *(n for n in notes if n)])
    kind = kind.replace("each (", "each in (").replace("each [", "each in [")
    default = _value(field.get_default(call_default_factory=True))
    cells = [f"`{key}`", kind, f"`{default}`", field.description or ""]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if not _is_section(field):
            lines.append(_row(f"{prefix}{name}", field))
    return lines


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def config_reference() -> str:
    """docs/configuration.md: one table for the top-level keys, then one per section."""
    lines = [HEADER, "## Top-level keys", "", *_table(Config, ""), ""]
    for name, field in Config.model_fields.items():
        if _is_section(field):
            lines += [f"## `{name}`", ""]
            if field.description:
                lines += [field.description, ""]
            lines += [*_table(field.annotation, f"{name}."), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aepsl.reference",
        description="Print the configuration reference (docs/configuration.md), generated "
        "from the field descriptions in aepsl/config.py.",
    )
    parser.add_argument("--write", metavar="PATH", help="write it to PATH instead of printing")
    args = parser.parse_args(argv)
    text = config_reference()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
