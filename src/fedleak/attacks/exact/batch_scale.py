"""Step 2 of the certificate: the batch's scale, the common factor of every sample's scale (``1/M`` for a mean-loss
gradient of ``M`` samples, ``lr/M`` for a one-step weight delta), and the batch size it goes with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedleak.attacks.exact.class_weights import admissible_factors
from fedleak.attacks.exact.options import NO_SIZE_FROM_SUM
from fedleak.attacks.exact.witnesses import WitnessFit

MULTIPLE_TOL = 0.03  # a scale within this (relative) of k times another shared scale, k >= 2: maybe k samples' blend


@dataclass(frozen=True)
class BatchScale:
    """The batch size ``M`` and the common factor of every sample's scale (``1/M`` for a mean-loss
    gradient; ``lr/M`` for a one-step weight delta), or ``None`` with the ``reason`` they are unknown.
    ``whole_batch_only``: the factor rests on one sample's own scale, so only a set that explains the whole
    gradient (all ``M`` samples, no room left) may be certified with it. ``inferred``: the batch size was read
    from the samples' common scale ``1/M``, not reported."""

    batch_size: int | None
    factor: float | None
    reason: str = ""
    whole_batch_only: bool = False
    inferred: bool = False


def agreeing_groups(values: np.ndarray, tol: float) -> list[np.ndarray]:
    """Indices of values that agree within ``tol`` (relative) with some value, largest group first."""
    groups = []
    for v in values:
        members = np.nonzero(np.abs(values / v - 1) <= tol)[0]
        groups.append(members)
    groups.sort(key=len, reverse=True)
    return groups


def batch_scale(fits: list[WitnessFit], strong: list[int], own: np.ndarray, reported: int | None, opts,
                voters: list[int] | None = None) -> BatchScale:
    """The batch's scale. With a known scale (``known_scale``) a reported batch size fixes it (``1/M`` for a
    mean loss, 1 for a summed one); otherwise, for a mean loss, the batch size ``M = own_k / s_k`` (``own_k``:
    sample ``k``'s own factor, its clipping times its label's class weight) that at
    least two strong samples agree on (``inferred``), or ``M = 1`` for a lone sample whose scale is 1 (the
    joint test then asks it to explain the whole gradient). With an unknown factor (a weight delta, or a
    class-weighted mean loss, ``1 / W``) the batch size must be reported; the factor is, for a class-weighted
    gradient whose label histograms allow few values of ``W``, the allowed value the most strong samples sit at
    (:func:`~fedleak.attacks.exact.class_weights.admissible_factors`), else the one the most ``voters`` share (every
    rebuilt input consistent with a witness row): every true sample sits at the factor, witnessed once or rebuilt
    too roughly to certify alike, while on two classes blends of nearly the same samples can share a scale of their
    own, so the strong samples alone may all be blends. At least two strong samples must sit at the factor, and it
    must not be a whole multiple ``k >= 2`` of another scale that two or more rebuilt inputs share (near a model's
    initialisation every input's loss is about the same, so a blend of ``k`` samples sits at about ``k`` times the
    factor, and ``k``-blends agree with each other); else the set certified must be the whole batch."""
    scales = np.array([fits[k].scale / own[k] for k in strong], dtype=float)
    if opts.known_scale and not opts.weighted_mean:
        if reported is not None:
            return BatchScale(reported, opts.common_scale(reported))
        if not opts.reduction.reveals_batch_size:
            return BatchScale(None, None, NO_SIZE_FROM_SUM)
        if len(strong) == 0:
            return BatchScale(None, None, "no rebuilt sample has the witnesses a certificate needs")
        sizes = 1.0 / scales
        whole = np.abs(sizes - np.round(sizes)) <= opts.scale_tol * sizes
        for grp in agreeing_groups(scales, opts.scale_tol):
            m = float(np.median(sizes[grp]))
            if round(m) >= 1 and abs(m - round(m)) <= opts.scale_tol * m and (len(grp) >= 2 or round(m) == 1):
                return BatchScale(int(round(m)), 1.0 / round(m), inferred=True)
        why = ("no batch size was reported, and no two rebuilt samples share a scale 1/M with M whole"
               if not whole.any() or len(strong) > 1 else
               "no batch size was reported, and a lone rebuilt sample proves its scale only when it is 1")
        return BatchScale(None, None, why)
    if reported is None:
        unknown = ("the update's scale is unknown (a class-weighted mean loss: 1 / the sum of the batch's weights)"
                   if opts.weighted_mean else "the update's scale is unknown (a weight delta)")
        return BatchScale(None, None, f"{unknown} and it reports no number of examples; without the batch size the "
                          "rebuilt samples cannot be checked jointly (give the update the number of examples its "
                          "client reported: num_examples)")
    if len(strong) == 0:
        return BatchScale(reported, None, "no rebuilt sample has the witnesses a certificate needs")
    allowed = admissible_factors(opts.class_weights, reported) if opts.known_scale and opts.weighted_mean else None
    if allowed is not None:  # 1 / W is one of few values (two classes: M + 1), as 1/M is for an unweighted loss
        near = allowed[np.abs(scales[:, None] / allowed[None, :] - 1).argmin(1)]
        at = np.abs(scales / near - 1) <= np.array([fits[k].scale_tol for k in strong])
        if not at.any():
            return BatchScale(reported, None, f"no rebuilt sample's scale is its label's weight over a sum of "
                              f"{reported} class weights (1 / W for one of the batch's label histograms)")
        values, support = np.unique(near[at], return_counts=True)
        return BatchScale(reported, float(values[support.argmax()]))
    voters = sorted(set(strong).union(voters or ()))
    votes = np.array([fits[k].scale / own[k] for k in voters], dtype=float)
    is_strong = np.isin(voters, strong)
    groups = agreeing_groups(votes, opts.scale_tol)
    best = max(groups, key=lambda grp: (len(grp), int(is_strong[grp].sum()),
                                        sum(sum(fits[voters[k]].counts) for k in grp)))
    backing = int(is_strong[best].sum())
    factor = float(np.median(votes[best][is_strong[best]] if backing else votes[best]))
    below = [float(np.median(votes[grp])) for grp in groups if len(grp) >= 2]
    multiple = [round(factor / f) for f in below if 0 < f < factor and round(factor / f) >= 2
                and abs(factor / f / round(factor / f) - 1) <= MULTIPLE_TOL]
    what = "1 / the sum of the weights" if opts.weighted_mean else "lr/M"
    why = (f"the scale most rebuilt inputs share is {multiple[0]} times another scale several share, where a blend "
           f"of {multiple[0]} samples would sit near a model's initialisation, so it may not be the update's common "
           f"scale ({what})" if multiple else
           f"fewer than two rebuilt samples that could be certified sit at the update's common scale ({what}: the "
           "scale most rebuilt inputs share)")
    return BatchScale(reported, factor, whole_batch_only=(backing < 2 or bool(multiple)) and reported > 1,
                      reason=f"{why}, and the rebuilt samples are not the whole batch")
