"""Wall time of the quantizer's phases (``capture``, ``search``, ``svd``, ``pack``, ``save``), summed over a run.

``with phase("search"): ...`` adds the block's wall time (CUDA synchronised at both ends) to ``PHASE_SECONDS``;
benchmarks read and :func:`reset_phases` it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

PHASE_SECONDS: dict[str, float] = {}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``PHASE_SECONDS[name]``."""
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        PHASE_SECONDS[name] = PHASE_SECONDS.get(name, 0.0) + time.perf_counter() - start


def reset_phases() -> None:
    PHASE_SECONDS.clear()


def phase_summary() -> str:
    """``"capture 12s, search 30s, ..."``: the seconds summed so far per phase (for a progress bar)."""
    return ", ".join(f"{name} {seconds:.0f}s" for name, seconds in PHASE_SECONDS.items())
