"""Two-class labels, and the sign of the factor that scales an update.

With two classes every loss vector ``p - q_y`` (``q_y`` the target: ``onehot(y)``, smoothed or not) sums to zero, so
any two are parallel: ``-s (p - q_y) = f (p - q_y')`` with the other label ``y'`` and
``f = s (q_y[y] - p_y) / (p_y - q_y'[y])``, which is ``s (1 - p_y) / p_y`` for a plain cross-entropy. The same
input thus explains the update's negative with the other label, at the factor ``f`` (rows' ratios, from which the
inputs are read, do not change sign). Where the update's factor is pinned (a gradient at its own scale ``1/M``; a
weight change ``before - after``, which is the learning rate times the gradient) its sign tells the label. Where it
is an unknown common factor, of a gradient (clipped, accumulated, summed, or a weight change ``new - old`` passed as
one: minus the learning rate times the gradient), the labels of the certified samples are proven only if no
positive common factor ``c`` and counts ``k_i >= 1`` (``sum k_i <= M``, the batch's size) give every one of them
its flipped factor ``f_i = k_i c``: otherwise the other labels explain the update's negative as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedleak.clients.mode import client_mode
from fedleak.focal import focal_factor
from fedleak.logits_of import per_sample_logits
from fedleak.reconstruction import Reconstruction, SampleRecovery

AGREE = 0.01  # flipped factors this close (relative) to k_i c are taken to agree: 100 times the certificate's own
PINNED = 1e-3  # a fitted scale this close (relative) to the one a gradient has pins its sign
MOST = 64  # the most times a sample may be held where the batch's size is not known
LABEL_UNPROVEN = "input exact, label unproven"  # the route's mark of a sample whose label rests on the sign

#: why a certified two-class sample's label is not proven; {what}: which samples, {factor}: the other reading's
UNSIGNED = ("its input is exact, but its label is not proven: the update's factor is unknown and may be negative "
            "(a weight change new - old passed as a gradient is minus the learning rate times it), and with two "
            "classes the update's negative is explained by {what} with the other label{s} at a positive factor "
            "({factor}); pass the client's weights before and after (a WeightUpdate), or the gradient at its own "
            "scale with num_examples")


def label_unproven(record: SampleRecovery) -> bool:
    """Whether this uncertified sample's input is exact and only its label rests on the update's sign (its route
    says so): a search that follows holds it."""
    return record.route.endswith(f", {LABEL_UNPROVEN})")


def flipped_factors(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, scales: np.ndarray,
                    label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                    focal_gamma: float = 0.0) -> np.ndarray | None:
    """Each sample's factor in the reading of the update's negative with the other label (per unit class weight,
    where the loss weighs classes; times ``s(p_y) / s(1 - p_y)`` for a focal loss, whose loss vectors carry the
    factor ``s`` of their label's probability), or None where the model does not have two classes. The model runs in
    eval mode, as the attacks read it."""
    with torch.no_grad(), client_mode(model, "eval"):
        logits = per_sample_logits(model(inputs.to(next(model.parameters()).dtype)), len(inputs))
    if logits.ndim != 2 or logits.shape[1] != 2:
        return None
    p = torch.softmax(logits.double(), 1).gather(1, labels.view(-1, 1).to(logits.device)).flatten().cpu().numpy()
    half = label_smoothing / 2
    factors = scales * (1 - half - p) / (p - half)
    if class_weights is not None:
        w = np.asarray(class_weights, dtype=float)
        factors = factors / w[1 - labels.cpu().numpy()]
    if focal_gamma:
        log_p = torch.log_softmax(logits.double(), 1).cpu()
        y = labels.view(-1, 1).cpu()
        own, other = (focal_factor(log_p.gather(1, k).flatten(), focal_gamma).numpy() for k in (y, 1 - y))
        factors = factors * own / other
    return factors


def shared_factor(factors: np.ndarray, most: int, magnitude: float | None = None) -> float | None:
    """A common factor ``c`` with every factor within :data:`AGREE` of ``k_i c`` (``k_i >= 1``, ``sum k_i <=
    most``), or None where there is none (or a factor is not positive: no positive reading takes that sample).
    ``magnitude``: the factor's size where it is known (only its sign is not): ``c`` is it, or there is none."""
    if not len(factors) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        return None
    tried = [magnitude] if magnitude is not None else [base / k for base in factors for k in range(1, most + 1)]
    for c in tried:
        counts = np.maximum(np.round(factors / c), 1)
        if counts.sum() <= most and np.all(np.abs(factors - counts * c) <= AGREE * factors):
            return float(c)
    return None


def without_unsigned_labels(model: nn.Module, rec: Reconstruction, batch_size: int | None,
                            label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                            own_scale: float | None = None, focal_gamma: float = 0.0,
                            magnitude: float | None = None) -> Reconstruction:
    """``rec`` with its certificates withdrawn where the update's factor is unknown, the model has two classes and
    the certified samples with the other labels explain the update's negative as well (:func:`shared_factor`).
    ``own_scale``: the scale a gradient of the reported batch gives each sample (``1/M``); certified samples that
    all sit at it are read as that gradient's, whose sign is known. ``magnitude``: the factor's size where only its
    sign is unknown (a change read from the model's weights, its sign unread, divided by the rate the server set:
    ``1/M``); the other labels then explain the negative only at whole multiples of it (a sample the model gives
    about even odds sits there in both readings)."""
    certified = [i for i, s in enumerate(rec.samples) if s.certified]
    if not certified or len(rec.samples) != len(rec):
        return rec
    index = torch.tensor(certified)
    scales = np.array([rec.samples[i].scale for i in certified], dtype=float)
    if own_scale is not None and np.all(np.abs(scales / own_scale - 1) <= PINNED):
        return rec
    factors = flipped_factors(model, rec.inputs[index], rec.labels[index], scales, label_smoothing, class_weights,
                              focal_gamma)
    if factors is None:
        return rec
    common = shared_factor(factors, batch_size or MOST, magnitude)
    if common is None:
        return rec
    many = len(certified) > 1
    why = UNSIGNED.format(what="the same inputs" if many else "the same input", s="s" if many else "",
                          factor=f"{common:.4g}")
    samples = tuple(replace(s, certified=False, reason=why, route=f"{s.route.split(' (')[0]} (uncertified, "
                                                                 f"{LABEL_UNPROVEN})") if s.certified else s
                    for s in rec.samples)
    return replace(rec, samples=samples, certified=torch.zeros(len(rec), dtype=torch.bool), batch_certified=False,
                   joint_residual=float("nan"), notes=(*rec.notes, why))
