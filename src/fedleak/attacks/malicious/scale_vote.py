"""The batch's common scale of a malicious-server attack, voted by its candidates (``lr/M`` for a one-step weight
delta, ``1/M`` for a mean-loss gradient), and when a vote must be refused (see :mod:`fedleak.attacks.malicious`)."""

from __future__ import annotations

import math

import numpy as np

from fedleak.attacks.exact.batch_scale import MULTIPLE_TOL
from fedleak.attacks.exact.like_blends import ALIKE_NEAR, ALIKE_TWO, unexcluded, withdrawn
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate


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


def without_unpinned_blends(rec: Reconstruction, voted: float | None, pinned_at: float | None, given: bool, tol: float,
                            num_classes: int) -> Reconstruction:
    """``rec`` with its certificates withdrawn where the scale they share was voted, not pinned, and each certified
    sample may be a blend of like samples at ``k`` times the batch's true scale (on two classes; on any model,
    near-copies: :func:`fedleak.attacks.exact.like_blends.unexcluded`): without the batch size, or with it where
    ``2 n <= M``. The scale is pinned where the server gave it (``given``: ``scale``, ``known_scale``) or where the vote
    (``voted``) falls within ``tol`` of the update's own scale (``pinned_at``: ``1/M`` for a mean-loss gradient,
    ``lr/M`` for a one-step weight change at the rate the server set), at which a blend of ``k`` does not sit."""
    if rec.num_certified == 0 or given:
        return rec
    if voted is not None and pinned_at is not None and abs(voted / pinned_at - 1) <= tol:
        return rec
    why = unexcluded(ALIKE_TWO if num_classes == 2 else ALIKE_NEAR, rec.num_certified, rec.batch_size, False)
    return withdrawn(rec, why) if why else rec


def own_scale(update: object) -> float | None:
    """The scale an update's samples sit at by its kind, where it is known: ``1/M`` for a gradient with its batch size
    (read as a mean-loss gradient's), ``lr/M`` for a weight change with the rate the server set and at most one local
    step; else None."""
    n = getattr(update, "num_examples", None)
    if not n:
        return None
    if isinstance(update, WeightUpdate):
        one_step = update.local_steps in (None, 1)
        return update.learning_rate / n if update.learning_rate is not None and one_step else None
    return 1.0 / n
