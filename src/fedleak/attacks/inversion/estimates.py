"""The exact route's estimates as points of the search.

A search warm-started from inputs the exact route rebuilt but did not certify moves them with every other free
sample, and while the others are still far off, the gradient it follows pulls exact inputs off too: on two-class
LFW faces, `auto` returned fewer exact copies than the exclusivity attack's own uncertified output held. Each
estimate is a point the search can return: where putting a moved sample back at its estimate, the other samples as
the search left them, lowers the search's own objective, it is put back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def restore_estimates(x: torch.Tensor, estimates: torch.Tensor, evaluate: Callable[[torch.Tensor], float]
                      ) -> tuple[torch.Tensor, float, int]:
    """``x`` (the search's free samples, its first ``len(estimates)`` warm-started from ``estimates``) with each
    warm-started sample set back to its estimate where that lowers ``evaluate`` (the search's objective of all free
    samples), one at a time in order; the objective's value there, and how many were set back."""
    value = evaluate(x)
    restored = 0
    for i in range(len(estimates)):
        if torch.equal(x[i], estimates[i]):
            continue
        trial = x.clone()
        trial[i] = estimates[i]
        tried = evaluate(trial)
        if tried < value:
            x, value, restored = trial, tried, restored + 1
    return x, value, restored
