"""The batch's common scale of a malicious-server attack, voted by its candidates (``lr/M`` for a one-step weight
delta, ``1/M`` for a mean-loss gradient), and when a vote must be refused (see :mod:`fedleak.attacks.malicious`)."""

from __future__ import annotations

import math

import numpy as np

from fedleak.attacks.exact.batch_scale import MULTIPLE_TOL


def mode_scale(fits: np.ndarray, ok: np.ndarray, tol: float,
               groups: np.ndarray | None = None) -> tuple[float | None, int]:
    """The scale most candidates agree on (each candidate offers its ``fits[k, y]`` where ``ok``), and how many.
    ``groups``: each candidate's group of copies (one input read off several rows, or a blend read twice), which
    agree with each other as one candidate agrees with itself: a group counts once."""
    ks, ys = np.nonzero(ok & (fits > 0))
    if len(ks) == 0:
        return None, 0
    logs = np.log(fits[ks, ys])
    order = np.argsort(logs)
    logs, ks = logs[order], ks[order]
    width = math.log1p(tol)
    best, best_at, hi = 0, None, 0
    for lo in range(len(logs)):
        while hi < len(logs) and logs[hi] - logs[lo] <= width:
            hi += 1
        count = len(np.unique(ks[lo:hi] if groups is None else groups[ks[lo:hi]]))
        if count > best:
            best, best_at = count, float(np.median(logs[lo:hi]))
    return (math.exp(best_at) if best_at is not None else None), best


def shared_fraction(scale: float, fits: np.ndarray, ok: np.ndarray, tol: float, most: int,
                    groups: np.ndarray | None = None, support: int = 2) -> int:
    """The whole ``k`` in ``2..most`` for which two or more candidates share a scale within ``MULTIPLE_TOL`` of
    ``scale / k``, or at least ``support`` (the vote's) lie within it, or 0. Near a model's initialisation every
    input's loss is about the same, so a blend of ``k`` samples sits at about ``k`` times the batch's scale, and
    ``k``-blends of near-identical samples agree with each other: a voted scale with such a fraction may be theirs,
    and the true samples' scale the fraction. Samples the client weighed apart (a focal loss read as a
    cross-entropy) spread around that fraction without two sharing it, while two of their blends may agree by
    chance: as many candidates around the fraction as voted for the scale refuse it too. ``groups``: as
    :func:`mode_scale` takes them."""
    for k in range(2, most + 1):
        near = ok & (np.abs(fits * k / scale - 1) <= MULTIPLE_TOL)
        if mode_scale(fits, near, tol, groups)[1] >= 2:
            return k
        ks = np.nonzero(near.any(1))[0]
        if len(np.unique(ks if groups is None else groups[ks])) >= max(support, 2):
            return k
    return 0
