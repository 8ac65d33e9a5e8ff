"""Telling a class-weighted cross-entropy from the rebuilt samples' scales.

Under ``F.cross_entropy(..., weight=w)`` with a mean reduction, sample ``k``'s term in the gradient is its own
gradient times ``w[y_k] / W`` (``W``: the sum of the batch's weights), so the samples of one label share a scale
and those of different labels do not. Read as a plain cross-entropy, most of them sit off the batch's common
scale and are taken for blends of samples. The attack is told the weights (option ``class_weights``); it does
not read them off the update, since a scale per label would weaken the check that tells a sample from a blend.
What it does is say so: where samples are left uncertified and the strongly witnessed samples' scales agree within
a label and differ across labels, a note gives the scales per label and asks for ``class_weights``.

Told the weights and the batch size ``M``, the common factor ``1 / W`` is one of the values the batch's label
histograms allow (:func:`admissible_factors`); where they are few (two classes: ``M + 1``) a sample at one of them
fixes it, as ``1/M`` does for an unweighted loss; where they are many, the certificate fits it from the samples.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

DIFFER = 0.01  # two labels' scales this far apart (relative) differ
MAX_SUMS = 1000  # label histograms enumerated at most, for the common factors a weighted batch can have


@functools.lru_cache(maxsize=16)
def admissible_factors(class_weights: tuple[float, ...], batch_size: int) -> np.ndarray | None:
    """Every common factor ``1 / W`` a class-weighted mean loss over ``batch_size`` samples can have: ``W`` is
    ``sum_c n_c w_c`` over the label histograms ``n`` of the batch (sorted, distinct); None where there are
    more than ``MAX_SUMS`` histograms (ten classes beyond a batch of 2), too many for the set to pin the factor
    down. With two classes, ``M + 1`` values: like ``1/M`` for an unweighted loss, one of them is the batch's."""
    k = len(class_weights)
    if math.comb(batch_size + k - 1, k - 1) > MAX_SUMS:
        return None
    w = np.asarray(class_weights, dtype=float)
    sums = [float(np.dot(w, np.bincount(labels, minlength=k)))
            for labels in itertools.combinations_with_replacement(range(k), batch_size)]
    values = np.unique(1.0 / np.asarray(sums))
    values.flags.writeable = False  # cached: shared by every call with these weights and batch size
    return values


def class_scale_note(records, opts) -> str:
    """The note when the strongly witnessed samples' scales (certified or not) agree within a label (at least
    one label with two of them, within ``scale_tol``) and differ across labels (by more than ``DIFFER``), and a
    sample is left uncertified; else empty. Nothing when ``class_weights`` is given."""
    if opts.class_weights is not None or all(r.certified for r in records):
        return ""
    by_label: dict[int, list[float]] = {}
    for r in records:
        if r.witnesses and r.witnesses[-1] >= opts.min_last and np.isfinite(r.scale) and r.scale > 0:
            by_label.setdefault(int(r.label), []).append(float(r.scale))
    if len(by_label) < 2:
        return ""
    medians = {c: float(np.median(s)) for c, s in by_label.items()}
    if any(abs(s / medians[c] - 1) > opts.scale_tol for c, s_all in by_label.items() for s in s_all):
        return ""  # a label whose samples do not share a scale: not the signature of class weights
    if not any(len(s) >= 2 for s in by_label.values()):
        return ""
    ordered = sorted(medians.values())
    if all(b / a - 1 <= DIFFER for a, b in zip(ordered, ordered[1:])):
        return ""
    top = max(medians.values())
    scales = ", ".join(f"{c}: {medians[c] / top:.4g}" for c in sorted(medians))
    return (f"the rebuilt samples' scales agree within each label and differ across labels (relative to the "
            f"largest, by label: {scales}), as a class-weighted cross-entropy's do: if the client's loss weighs "
            "classes (F.cross_entropy(..., weight=w)), pass class_weights")
