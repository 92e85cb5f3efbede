"""The worker processes of aepsl's CPU pools (the CRF's on the CPU, labels'): spawned, with
Ctrl-C left to the main process, which ends the pool and says so in one line.

Imports no torch at module level: pydensecrf's CRF workers never load it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored in this process within the block, so that worker processes spawned in it
    start ignoring it: a Ctrl-C while a worker is still importing, before its initializer runs,
    printed that worker's traceback. The main process handles Ctrl-C again after the block."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def worker_setup(torch_threads: bool, max_pixels: int | None = None) -> None:
    """A pool's initializer: Ctrl-C left to the main process (else every worker printed a
    KeyboardInterrupt traceback); with `torch_threads`, one torch thread per worker; with
    `max_pixels`, the command's data.max_pixels (a spawned process starts from the default)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if torch_threads:
        import torch

        torch.set_num_threads(1)
    if max_pixels is not None:
        from aepsl.io import set_pixel_limit

        set_pixel_limit(max_pixels)  # for the worker's whole life
