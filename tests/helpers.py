"""What several test files share: the presets' paths, the tiny runs' overrides, and the
bad-input contract (`refuse`). Imported as `from helpers import ...` (tests/ is on sys.path, as
for `from conftest import make_folder_dataset`); the fixtures are in conftest.py."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Sequence
from pathlib import Path

from aepsl.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"
DEMO = str(CONFIGS / "demo_tiny.yaml")  # the tiny preset every stage test starts from
DEMO_FULL = str(CONFIGS / "demo.yaml")  # `aepsl demo`'s preset (ImageNet weights)

# A run small enough for a test on a CPU: one epoch of mining on 32-pixel images; four training
# iterations on 32-pixel crops. fp32 everywhere, so results do not depend on the hardware.
TINY_MINE = ["mine.epochs=1", "data.image_size=32", "mine.batch_size=4", "precision=fp32"]
TINY_TRAIN = [
    "train.iterations=4",
    "train.crop_size=32",
    "train.batch_size=2",
    "precision=fp32",
    "crf.workers=1",
]


def overrides(*parts: str | Sequence[str]) -> list[str]:
    """`key=value` overrides joined in order: lists (TINY_MINE, TINY_TRAIN) and single ones. A
    key given again takes the later value in the earlier place, so each key appears once."""
    merged: dict[str, str] = {}
    for part in parts:
        for text in [part] if isinstance(part, str) else part:
            key, _, value = text.partition("=")
            merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


# ------------------------------------------------------------------ the bad-input contract


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`, less the `skip` subtree."""
    tree: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        tree[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else None
    return tree


def refuse(
    capsys,
    tmp_path: Path,
    argv: list[str],
    *fragments: str,
    out: Path | None = None,
    tolerate: tuple[type[Warning], ...] = (),
    progress: bool = False,
) -> str:
    """Run the CLI and check the bad-input contract; returns the error line. With `progress`,
    the lines of a stage's progress bar (redrawn with \\r, ended before the error) are not
    counted."""
    before = snapshot(tmp_path, skip=out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
        gc.collect()  # an unclosed file would warn here
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    if progress:
        lines = [line for line in lines if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"aepsl {argv[0]}: error: "), line
    assert err.endswith(f"{line}\n") and f"\r{line}" not in err, err  # a line of its own
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in line, line
    assert [str(w.message) for w in caught if not issubclass(w.category, tolerate)] == []
    assert snapshot(tmp_path, skip=out) == before, "something was written outside --out"
    return line


def check(capsys, tmp_path: Path, root: Path, *fragments: str, extra: tuple = (), **kw) -> str:
    argv = ["data-info", DEMO, f"data.root={root}", *extra, "--check"]
    return refuse(capsys, tmp_path, argv, *fragments, **kw)


class WritesMarker:
    """Unpickling this opens (creates) `path`: code execution if the loader allows it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
