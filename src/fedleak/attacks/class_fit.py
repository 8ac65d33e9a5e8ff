"""One sample's gradient fitted to an update, class by class: how the first-layer attack checks a rebuilt input.

The model's gradient at the rebuilt input, for one class, times one scale (1 for a client's gradient, the learning
rate for the change of one SGD step) must reproduce every tensor of the update; :func:`class_fit` gives that scale and
the largest relative mismatch. The update is read once per reading (:class:`Observed`), each class's gradient is
computed once per input (:class:`ClassGradients`), and a class that does not fit is told from the fit's products
alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.clipped_values import ValueClip
from fedleak.nets.float64 import dot64, fit_products64, misfit64
from fedleak.updates import batch_gradients

SCREEN_RESIDUAL = 1e-3  # a fit whose residual, read off its products, is above this is not computed entry by entry
NEAR = 1e-3  # a trial scale this close (relative) to the fit's gives its residual from one pass's products


@dataclass(frozen=True)
class Fit:
    """How the gradient of the rebuilt input and one label matches the update: ``scale`` (update over gradient:
    1 for a client's gradient, its learning rate for an update of one SGD step) and ``residual``, the largest
    relative mismatch over the update's tensors after that scale."""

    scale: float
    residual: float


@dataclass(frozen=True)
class Observed:
    """The update's tensors as every class's fit reads them, made once per reading: flat, in their own dtype
    (``flat``; every product of them is taken in float64 a piece at a time) and where the update was clipped by
    value (``clip``), its entries at the bound zeroed (``free``: the tensors themselves without a clip) and where
    they are (``censored``); their squared norms (:attr:`norms2`, :attr:`free_norms2`) are taken where a fit reads
    them (one with a clip: without one, each fit's single pass takes them)."""

    names: tuple[str, ...]
    flat: tuple[torch.Tensor, ...]
    clip: ValueClip | None = None
    free: tuple[torch.Tensor, ...] = ()
    censored: tuple[torch.Tensor, ...] = ()

    @classmethod
    def of(cls, observed: dict[str, torch.Tensor], clip: ValueClip | None) -> Observed:
        names = tuple(observed)
        flat = tuple(observed[n].detach().flatten() for n in names)
        if clip is None:
            return cls(names, flat, free=flat)
        censored = tuple(clip.censored(t) for t in flat)
        return cls(names, flat, clip, tuple(t.masked_fill(c, 0.0) for t, c in zip(flat, censored)), censored)

    @functools.cached_property
    def norms2(self) -> tuple[float, ...]:
        return tuple(dot64(t, t) for t in self.flat)

    @functools.cached_property
    def free_norms2(self) -> tuple[float, ...]:
        return self.norms2 if self.clip is None else tuple(dot64(t, t) for t in self.free)


class ClassGradients:
    """The model's gradient at one input ``x`` for each class asked for (flat, in the order of ``names``), each
    computed once: a second reading of the same input (under a clip's hypothesis) reuses them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> None:
        self.model, self.x, self.names = model, x, names
        self._known: dict[int, list[torch.Tensor]] = {}

    def reads(self, x: torch.Tensor, names: tuple[str, ...]) -> bool:
        """Whether these are the gradients at ``x`` of the tensors ``names``."""
        return names == self.names and x.shape == self.x.shape and bool(torch.equal(x, self.x))

    def of(self, label: int) -> list[torch.Tensor]:
        if label not in self._known:
            # the attack checked the model; the input is its own reading, the label one of the model's classes
            grads = batch_gradients(self.model, self.x, torch.tensor([label], device=self.x.device))
            self._known[label] = [grads[n].flatten() for n in self.names]
        return self._known[label]


def class_fit(gradients: ClassGradients, label: int, observed: Observed, signed: bool = False) -> Fit:
    """The gradient at ``x`` (``gradients``) for ``label`` against ``observed``; where it was clipped by value the
    scale is fitted on the entries below the bound and the scaled gradient is clipped alike before it is compared.
    ``signed``: a negative scale (the update is the gradient's negative) may fit; with two classes it may not, since
    ``-(p - onehot(y))`` is then parallel to the other label's ``p - onehot(y')`` and the label could not be told.

    Each tensor's residual over the entries the scale was fitted on is first read off the products the scale took,
    ``||t - s g||^2 = ||t||^2 - 2 s t.g + s^2 g.g`` (float64: to about 1e-8 of ``||t||``; with a clip, a lower bound
    of the whole residual): a class that does not fit is told from it, and the residual of one that may is computed
    where that leaves it near the tolerances (below :data:`SCREEN_RESIDUAL`). Without a clip the scale is first
    fitted on every tensor but the largest (its biases, mostly: a few entries), and one pass over each tensor takes
    the products at that trial scale (:func:`~fedleak.nets.float64.fit_products64`), from which the residual at the
    whole fit's scale follows without a second pass where the two scales agree (to :data:`NEAR`), as they do where
    the class fits; elsewhere the residual is computed entry by entry."""
    ours = [g.to(t.device) for g, t in zip(gradients.of(label), observed.flat)]
    if observed.clip is None:
        return _fit_in_one_pass(ours, observed, signed)
    tg = [dot64(g, t) for g, t in zip(ours, observed.free)]  # the entries below the bound only
    gg = [dot64(g, g.masked_fill(c, 0.0)) for g, c in zip(ours, observed.censored)]
    scale = sum(tg) / max(sum(gg), 1e-300)
    if not _admissible(scale, signed):
        return Fit(scale, math.inf)
    screened = _screened(observed.free_norms2, observed.norms2, scale, tg, gg)
    if screened > SCREEN_RESIDUAL:
        return Fit(scale, screened)
    return Fit(scale, max(_relative(misfit64(t, g, scale, observed.clip.cut), math.sqrt(tt))
                          for g, t, tt in zip(ours, observed.flat, observed.norms2)))


def _fit_in_one_pass(ours: list[torch.Tensor], observed: Observed, signed: bool) -> Fit:
    """:func:`class_fit` of an update not clipped: the products of every tensor at a trial scale (the fit of all
    tensors but the largest), then the residuals at the whole fit's scale."""
    largest = max(range(len(ours)), key=lambda i: ours[i].numel())
    rest = [i for i in range(len(ours)) if i != largest]
    trial_gg = sum(dot64(ours[i], ours[i]) for i in rest)
    trial = sum(dot64(ours[i], observed.flat[i]) for i in rest) / trial_gg if trial_gg > 0 else 0.0
    trial = trial if math.isfinite(trial) else 0.0
    products = [fit_products64(t, g, trial) for g, t in zip(ours, observed.flat)]
    tg, gg = [p.tg for p in products], [p.gg for p in products]
    scale = sum(tg) / max(sum(gg), 1e-300)
    if not _admissible(scale, signed):
        return Fit(scale, math.inf)
    norms2 = [p.tt for p in products]
    screened = _screened(norms2, norms2, scale, tg, gg)
    if screened > SCREEN_RESIDUAL:
        return Fit(scale, screened)
    if abs(scale - trial) <= NEAR * abs(scale):
        return Fit(scale, max(_relative(p.misfit(trial, scale), math.sqrt(p.tt)) for p in products))
    return Fit(scale, max(_relative(misfit64(t, g, scale), math.sqrt(tt))
                          for g, t, tt in zip(ours, observed.flat, norms2)))


def _admissible(scale: float, signed: bool) -> bool:
    return math.isfinite(scale) and (scale > 0 or (signed and scale < 0))


def _screened(free_norms2: Sequence[float], norms2: Sequence[float], scale: float, tg: list[float], gg: list[float]
              ) -> float:
    """The largest relative residual read off the fit's products (the squared norms of the tensors' entries the
    scale was fitted on, and of the whole tensors): all of it without a clip, a lower bound with one (the entries
    at the bound only add to it)."""
    return max(_relative(math.sqrt(max(ff - 2 * scale * a + scale * scale * b, 0.0)), math.sqrt(tt))
               for ff, tt, a, b in zip(free_norms2, norms2, tg, gg))


def _relative(diff: float, ref: float) -> float:
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
