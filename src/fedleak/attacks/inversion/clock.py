"""One time budget and one progress bar for an attack run, shared by all of its stages.

Every optimisation attack takes ``time_budget`` (seconds) and ``progress`` (a tqdm bar on stderr); ``auto``
takes a ``budget`` for its whole run, exact route and optimisation together. Both are a :class:`RunClock`: the
optimisation attacks make one of their own, ``auto`` makes one and hands it to each stage, so one bar shows the
stage running (``auto: exclusivity``, ``auto: dlm+``) and the seconds left.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from fedleak.errors import FedleakError


class RunClock:
    """The deadline of a run (``budget`` seconds from now; ``None``: no limit) and its progress bar.

    A run is a sequence of stages (:meth:`stage`); a stage may carry a deadline of its own (``limit``
    seconds), the earlier of the two applies. The bar (only when ``progress``) is created on the first stage
    and counts that stage's iterations; its description is ``"<label>: <stage>"`` and, with a budget, it shows
    the seconds left.
    """

    def __init__(self, budget: float | None = None, *, progress: bool = False, label: str = "") -> None:
        if budget is not None and not budget > 0:
            raise FedleakError(f"the time budget must be positive seconds, got {budget}")
        self.start = time.perf_counter()
        self.budget = None if budget is None else float(budget)
        self.progress = bool(progress)
        self.label = label
        self.stage_name = ""
        self._stage_deadline: float | None = None
        self._bar: Any = None

    # -- time -------------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def deadline(self) -> float | None:
        """The ``perf_counter`` time at which the current stage must stop (None: no limit)."""
        run = None if self.budget is None else self.start + self.budget
        ends = [t for t in (run, self._stage_deadline) if t is not None]
        return min(ends) if ends else None

    def left(self) -> float | None:
        """Seconds left to the current stage (None: no limit; never negative)."""
        end = self.deadline
        return None if end is None else max(0.0, end - time.perf_counter())

    def spent(self) -> bool:
        """Whether the current stage's time is up."""
        end = self.deadline
        return end is not None and time.perf_counter() >= end

    def no_time_for(self, seconds: float) -> bool:
        """Whether the stage's time is up, or too short for a step that takes ``seconds`` (the last one's
        duration): a long step is not started when it would end past the deadline."""
        left = self.left()
        return left is not None and (left <= 0.0 or left < seconds)

    # -- stages and the bar ------------------------------------------------------------------------------
    def stage(self, name: str, total: int | None = None, *, limit: float | None = None) -> None:
        """Begin a stage called ``name`` of ``total`` iterations (None: unknown), at most ``limit`` seconds."""
        self.stage_name = name
        self._stage_deadline = None if limit is None else time.perf_counter() + float(limit)
        if not self.progress:
            return
        desc = f"{self.label}: {name}" if self.label else name
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            self._bar.set_description(desc, refresh=False)
            self._bar.reset(total=total)
        self._show()
        self._bar.refresh()

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        """Count ``n`` iterations of the current stage (and show the objective ``loss``)."""
        if self._bar is None:
            return
        self._show(loss)
        self._bar.update(n)

    def _show(self, loss: float | None = None) -> None:
        post = {}
        left = self.left()
        if left is not None:
            post["left"] = f"{left:.0f} s"
        if loss is not None:
            post["loss"] = f"{loss:.3e}"
        self._bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> RunClock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepDecay:
    """Step decay of the learning rate by 10x at 3/8, 5/8 and 7/8 of a run, where the run is ``iterations``
    long or, when the clock's deadline will end it sooner, as long as the iterations that fit in its share of
    the time left (``1/share`` of it: restarts divide it), re-estimated from the pace so far, so that a
    time-limited search still decays. The factor never goes back up.
    """

    MILESTONES = (3 / 8, 5 / 8, 7 / 8)

    def __init__(self, iterations: int, clock: RunClock, *, enabled: bool = True, share: int = 1) -> None:
        self.iterations = int(iterations)
        self.enabled = enabled
        left = clock.left()
        self.allotted = None if left is None else left / max(1, int(share))
        self.start = time.perf_counter()  # after reading the clock: the last run ends at its deadline, not before
        self.done_fraction = 0.0
        self.planned = float(self.iterations)

    def update(self, it: int) -> None:
        """Re-plan after ``it`` iterations of this run."""
        if self.allotted is not None and it >= 3:
            pace = (time.perf_counter() - self.start) / it
            self.planned = min(float(self.iterations), self.allotted / max(pace, 1e-9))
        self.done_fraction = max(self.done_fraction, it / max(self.planned, 1.0))

    def factor(self) -> float:
        if not self.enabled:
            return 1.0
        return 0.1 ** sum(self.done_fraction >= m for m in self.MILESTONES)

    def finished(self, it: int) -> bool:
        """Whether this run has used its iterations or (with a deadline) its share of the time."""
        return it >= self.iterations or (
            self.allotted is not None and time.perf_counter() - self.start >= self.allotted)
