"""Where and how much the audit runs: a pool of worker processes, a bound on its backlog, and the ledger of
what it did each round.

* :func:`make_audit_executor`: ``"process"`` starts ``workers`` spawned worker processes (each gets the audit's
  model template once, in its initialiser, and rebuilds each round's model from the sent weights a job carries);
  ``"thread"`` one background thread.
* :func:`choose_audited`: when the jobs still pending (the *backlog*) leave less room under the bound
  ``audit_backlog`` than a round brings updates, a seeded sample of the round's updates is audited (drawn from
  ``(seed, round)`` over the updates sorted by partition and node, so a rerun draws the same ones); the others are
  recorded as not audited, never dropped silently.
* :class:`AuditLedger` (thread-safe): per round the updates received and audited, the backlog they met, the
  sample's seed and the audit's lag (from the end of the round's aggregation to its last audit result), read
  back as :class:`~fedleak.federation.results.RoundAudit` records.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np
from torch import nn

from fedleak.errors import OptionError
from fedleak.federation.audit_worker import AUDIT_NICENESS, init_worker, worker_ready
from fedleak.federation.results import RoundAudit
from fedleak.federation.template import shipped

__all__ = ["AuditLedger", "check_pool_options", "choose_audited", "make_audit_executor",
           "pending_jobs"]


def check_pool_options(mode: str, workers: int, backlog: int | None) -> None:
    """:class:`OptionError` unless ``workers`` and ``backlog`` fit the audit ``mode``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OptionError(f"audit_workers must be a whole number of at least 1, got {workers!r}")
    if workers > 1 and mode != "process":
        raise OptionError(f"audit_workers={workers} needs audit_mode 'process' (worker processes); "
                          f"audit_mode '{mode}' runs one audit at a time")
    if backlog is not None and (isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0):
        raise OptionError(f"audit_backlog must be a whole number of at least 0 (or None: no bound), got {backlog!r}")


def choose_audited(keys: Sequence[tuple[int, int]], backlog: int, bound: int | None, seed: int,
                   server_round: int) -> tuple[int, ...]:
    """Indices (into ``keys``: one ``(partition, node_id)`` per update of the round) of the updates to audit:
    all when ``backlog + len(keys)`` stays within ``bound`` (or there is no bound), else a sample of
    ``max(bound - backlog, 0)`` drawn with ``numpy.random.default_rng([seed, server_round])`` from the updates
    sorted by ``keys``. Sorted ascending."""
    n = len(keys)
    if bound is None or backlog + n <= bound:
        return tuple(range(n))
    room = max(bound - backlog, 0)
    order = sorted(range(n), key=lambda i: keys[i])
    rng = np.random.default_rng([int(seed), int(server_round)])
    return tuple(sorted(order[i] for i in rng.choice(n, size=room, replace=False)))


def pending_jobs(futures: Iterable[Future]) -> int:
    """Jobs submitted and not finished yet."""
    return sum(1 for f in futures if not f.done())


def wait_for(futures: Iterable[Future]) -> float:
    """Wait until every job in ``futures`` is finished; returns the seconds spent waiting."""
    start = time.perf_counter()
    futures_wait(list(futures))
    return time.perf_counter() - start


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Spawned workers re-import the parent's ``__main__`` (its file or module name) unless it has none:
    a user's script that calls ``run_federation`` without an ``if __name__ == "__main__"`` guard would run
    again in the worker. The audit worker needs nothing from ``__main__``, so hide it while spawning."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    try:
        for k in saved:
            if k == "__file__":
                delattr(main, k)
            else:
                setattr(main, k, None)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def make_audit_executor(mode: str, workers: int, template: nn.Module) -> Executor:
    """The executor of the audit jobs: ``workers`` spawned processes (``"process"``; each gets ``template`` in
    its initialiser, at a lowered CPU priority) started now, or one thread (``"thread"``)."""
    if mode != "process":
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedleak-audit")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(AUDIT_NICENESS, shipped(template)))
    with main_module_hidden():  # each submit spawns a worker while none is idle: start them all now
        for _ in range(workers):
            pool.submit(worker_ready)
    return pool


class AuditLedger:
    """Per-round bookkeeping of the audit (thread-safe: results come back on the executor's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: dict[int, RoundAudit] = {}
        self._aggregated: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._backlog_after: dict[int, int] = {}

    def arrived(self, entry: RoundAudit) -> None:
        """A round's updates arrived and ``entry.audited`` of them went to the audit."""
        with self._lock:
            self._rounds[entry.round] = entry

    def aggregated(self, server_round: int, backlog: int) -> None:
        """The round's aggregation ended (its lag starts now) with ``backlog`` audit jobs pending."""
        with self._lock:
            self._aggregated[server_round] = time.perf_counter()
            self._backlog_after[server_round] = int(backlog)

    def backlog_after(self, server_round: int) -> int | None:
        """Audit jobs pending when ``server_round`` was aggregated (None: not aggregated)."""
        with self._lock:
            return self._backlog_after.get(server_round)

    def finished(self, server_round: int) -> None:
        """One audit result of ``server_round`` came back."""
        with self._lock:
            self._last[server_round] = time.perf_counter()

    def rounds(self) -> tuple[RoundAudit, ...]:
        """Every round's record, with its lag, sorted by round."""
        with self._lock:
            out = []
            for rnd, entry in sorted(self._rounds.items()):
                lag = None
                if entry.audited and rnd in self._last and rnd in self._aggregated:
                    lag = max(self._last[rnd] - self._aggregated[rnd], 0.0)
                out.append(RoundAudit(entry.round, entry.received, entry.audited, entry.backlog, entry.bound,
                                      entry.seed, lag))
            return tuple(out)
