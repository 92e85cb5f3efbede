"""Data parallelism: `torchrun --nproc_per_node 2` (gloo, CPU) against one process with the same
global batch: the same crops, the same weights (to float rounding), the same region PNGs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO, TINY_MINE, TINY_TRAIN, overrides

from aepsl import runtime
from aepsl.errors import UserError
from aepsl.io import read_index_png
from aepsl.models.saved import read_model_file
from aepsl.runtime import per_rank_batch, shard_batches
from aepsl.training import EpochSampler

TINY = overrides(
    TINY_MINE,
    TINY_TRAIN,
    "mine.epochs=2",
    "mine.visualise=2",
    "train.batch_size=4",
    "train.checkpoint_every=2",
)
# `python -m aepsl`, except that the classifier's dropout is off: dropout draws from each
# process's own generator, so its masks cannot match between 1 and 2 processes (documented);
# with it off, everything else must match.
ENTRY = """import sys
import torch
torch.nn.Dropout2d = torch.nn.Identity
from aepsl.cli import main
from aepsl.models.saved import read_model_file
raise SystemExit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(base: Path, nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    """`aepsl ARGS` in one plain process, or under torchrun with `nproc` processes."""
    entry = base / "entry.py"
    entry.write_text(ENTRY)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each process
    if nproc == 1:
        command = [sys.executable, str(entry), *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(entry),
            *args,
        ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conftest import make_folder_dataset

    return make_folder_dataset(tmp_path_factory.mktemp("ddp") / "data", n=10)


def _run_both(base: Path, args: list[str]) -> tuple[Path, Path]:
    outs = []
    for nproc in (1, 2):
        out = base / f"np{nproc}"
        done = _launch(base, nproc, [*args, "--out", str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(out)
    return outs[0], outs[1]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """`aepsl run` (one erasing step) by one process and by two."""
    base = tmp_path_factory.mktemp("ddp_run")
    return _run_both(base, ["run", DEMO, f"data.root={dataset}", *TINY, "mine.steps=1"])


def _max_difference(one_dir: Path, two_dir: Path, path: str) -> float:
    """The largest difference between the two runs' state dicts at `path`."""
    one = read_model_file(one_dir / path)[1]
    two = read_model_file(two_dir / path)[1]
    assert one.keys() == two.keys()
    return max((one[k].double() - two[k].double()).abs().max().item() for k in one)


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_index_png(p) for p in sorted(folder.glob("*.png"))}


def test_two_processes_train_as_one(runs):
    one, two = runs
    assert _max_difference(one, two, "mine/step1/classifier.pt") < 1e-5
    assert _max_difference(one, two, "train/model.pt") < 1e-5
    a, b = (json.loads((o / "train/train.json").read_text())["final_loss"] for o in runs)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_two_processes_write_the_same_files(runs):
    one, two = runs
    for folder in ("mine/step1/regions", "mine/regions", "labels", "predict", "predict_crf"):
        a, b = _pngs(one / folder), _pngs(two / folder)
        assert a.keys() == b.keys() and len(a) > 0, folder
        for name in a:
            assert np.array_equal(a[name], b[name]), f"{folder}/{name}"
    for path in ("mine/metrics.json", "labels/metrics.json", "train/metrics.json"):
        assert json.loads((one / path).read_text()) == json.loads((two / path).read_text()), path
    for stage in ("mine", "labels", "train", "predict"):
        assert json.loads((two / stage / "manifest.json").read_text())["complete"]
    assert (two / "report.html").is_file()
    assert not (two / "train" / "checkpoint.pt").exists()
    leftovers = [p for p in two.rglob(".*") if p.name != ".aepsl-write-test"]
    assert not leftovers  # no temporary file of a concurrent write left behind


def test_erasing_steps_read_every_ranks_regions(dataset, tmp_path):
    """Two steps: step 2 trains on images erased with regions both ranks wrote. Step 1 matches
    to rounding; step 2 only to 1e-3, because its training amplifies rounding differences: one
    process with 2 threads instead of 1 differs from itself by as much (4e-4 here)."""
    one, two = _run_both(tmp_path, ["mine", DEMO, f"data.root={dataset}", *TINY, "mine.steps=2"])
    assert _max_difference(one, two, "mine/step1/classifier.pt") < 1e-5
    assert _max_difference(one, two, "mine/step2/classifier.pt") < 1e-3
    a, b = _pngs(one / "mine/step1/regions"), _pngs(two / "mine/step1/regions")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    a, b = _pngs(one / "mine/step2/regions"), _pngs(two / "mine/step2/regions")
    differing = sum(int((a[k] != b[k]).sum()) for k in a)
    assert a.keys() == b.keys() and differing <= 0.01 * sum(v.size for v in a.values())
    losses = [
        [s["train_loss"] for s in json.loads((o / "mine/metrics.json").read_text())["steps"]]
        for o in (one, two)
    ]
    assert np.allclose(losses[0], losses[1], atol=1e-4)


def test_batch_not_divisible_by_processes_is_a_clear_error(dataset, tmp_path):
    args = ["mine", DEMO, f"data.root={dataset}", *TINY, "mine.batch_size=3"]
    done = _launch(tmp_path, 2, [*args, "--out", str(tmp_path / "out")])
    assert done.returncode != 0
    assert (
        "aepsl mine: error: mine.batch_size=3 is the global batch and must be divisible by the "
        "number of processes (2)" in done.stderr
    )
    assert not (tmp_path / "out" / "mine").exists()


# ------------------------------------------------------------------ sharding, in one process


def test_shards_partition_each_global_batch():
    order = list(range(10, 21))  # 11 items: two global batches of 4, 3 dropped
    shards = [shard_batches(order, 4, r, 2) for r in range(2)]
    assert shards == [[10, 11, 14, 15], [12, 13, 16, 17]]
    assert shard_batches(order, 4, 0, 1) == order  # one process: unchanged


@pytest.mark.parametrize("offset", [0, 4, 8])
def test_resumed_shards_follow_the_same_permutation(offset):
    whole = list(EpochSampler(13, seed=3, offset=offset))
    shards = [
        list(EpochSampler(13, 3, offset, batch_size=4, rank=r, world_size=2)) for r in range(2)
    ]
    for r, shard in enumerate(shards):
        assert len(shard) == len(EpochSampler(13, 3, offset, batch_size=4, world_size=2))
        batches = range(0, len(whole) - 3, 4)  # the complete global batches of 4
        assert shard == [i for b in batches for i in whole[b + 2 * r : b + 2 * r + 2]]


def test_per_rank_batch(monkeypatch):
    assert per_rank_batch(16, "train.batch_size") == 16
    monkeypatch.setattr(runtime, "world_size", lambda: 4)
    assert per_rank_batch(16, "train.batch_size") == 4
    with pytest.raises(UserError, match=r"train\.batch_size=6 is the global batch"):
        per_rank_batch(6, "train.batch_size")
