"""Per-sample LPs on all cores: once the targets are fixed the samples' LPs are independent (spec §4.3 Step C).

The LP solvers hold the GIL (threads gave no speed-up: CPU/wall 0.98), so the samples are solved in worker
*processes*. The workers are forked from the caller when a batch of LPs starts, so they share the network
arrays and the batch state without pickling them; only the sample index goes out and the
:class:`~fedleak.fishing.lp.SampleOutcome` (the perturbed input) comes back. Forking is safe on Linux only (macOS
system libraries are not fork-safe, Windows cannot fork); elsewhere, or for fewer samples than two per worker,
the LPs run in the calling process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_TASK: Callable[[int], object] | None = None  # set in the parent just before the workers fork


def _run(i: int) -> object:
    assert _TASK is not None
    return _TASK(i)


def _quiet_threads() -> None:
    """One thread per worker process: the workers are the parallelism (and a forked OpenMP pool may hang)."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def resolve_workers(workers: int | None) -> int:
    """``None`` means one worker per core this process may use."""
    if workers is not None:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def parallel_map(task: Callable[[int], T], items: Sequence[int], workers: int) -> list[T]:
    """``[task(i) for i in items]``, spread over ``workers`` forked processes when that can pay off."""
    global _TASK
    if workers <= 1 or len(items) < 2 * workers or not sys.platform.startswith("linux"):
        return [task(i) for i in items]
    _TASK = task
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_quiet_threads) as pool:
            return list(pool.map(_run, items, chunksize=max(1, len(items) // (8 * workers))))
    finally:
        _TASK = None
