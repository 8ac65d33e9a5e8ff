"""One sample's gradient fitted to an update, class by class: how the first-layer attack checks a rebuilt input.

The model's gradient at the rebuilt input, for one class, times one scale (1 for a client's gradient, the learning
rate for the change of one SGD step) must reproduce every tensor of the update; :func:`class_fit` gives that scale and
the largest relative mismatch. The update is read once per reading (:class:`Observed`), each class's gradient is
computed once per input (:class:`ClassGradients`), and a class that does not fit is told from the fit's products
alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.clipped_values import ValueClip
from fedleak.nets.float64 import dot64, misfit64
from fedleak.updates import compute_gradient_update

SCREEN_RESIDUAL = 1e-3  # a fit whose residual, read off its products, is above this is not computed entry by entry


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
    (``flat``; every product of them is taken in float64 a piece at a time), their squared norms (``norms2``), and
    where the update was clipped by value (``clip``), its entries at the bound zeroed (``free``, and their squared
    norms ``free_norms2``: the tensors themselves without a clip) and where they are (``censored``)."""

    names: tuple[str, ...]
    flat: tuple[torch.Tensor, ...]
    norms2: tuple[float, ...]
    clip: ValueClip | None = None
    free: tuple[torch.Tensor, ...] = ()
    censored: tuple[torch.Tensor, ...] = ()
    free_norms2: tuple[float, ...] = ()

    @classmethod
    def of(cls, observed: dict[str, torch.Tensor], clip: ValueClip | None) -> Observed:
        names = tuple(observed)
        flat = tuple(observed[n].detach().flatten() for n in names)
        norms2 = tuple(dot64(t, t) for t in flat)
        if clip is None:
            return cls(names, flat, norms2, free=flat, free_norms2=norms2)
        censored = tuple(clip.censored(t) for t in flat)
        free = tuple(t.masked_fill(c, 0.0) for t, c in zip(flat, censored))
        return cls(names, flat, norms2, clip, free, censored, tuple(dot64(t, t) for t in free))


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
            grads = compute_gradient_update(self.model, self.x, torch.tensor([label], device=self.x.device)).gradients
            self._known[label] = [grads[n].flatten() for n in self.names]
        return self._known[label]


def class_fit(gradients: ClassGradients, label: int, observed: Observed, signed: bool = False) -> Fit:
    """The gradient at ``x`` (``gradients``) for ``label`` against ``observed``; where it was clipped by value the
    scale is fitted on the entries below the bound and the scaled gradient is clipped alike before it is compared.
    ``signed``: a negative scale (the update is the gradient's negative) may fit; with two classes it may not, since
    ``-(p - onehot(y))`` is then parallel to the other label's ``p - onehot(y')`` and the label could not be told.

    Each tensor's residual over the entries the scale was fitted on is first read off the products the scale took,
    ``||t - s g||^2 = ||t||^2 - 2 s t.g + s^2 g.g`` (float64: to about 1e-8 of ``||t||``; with a clip, a lower bound
    of the whole residual), and the residual is computed entry by entry only where that leaves it near the
    tolerances (below :data:`SCREEN_RESIDUAL`): a class that does not fit costs no pass over the update."""
    ours = [g.to(t.device) for g, t in zip(gradients.of(label), observed.flat)]
    clip = observed.clip
    if clip is None:
        tg = [dot64(g, t) for g, t in zip(ours, observed.flat)]
        gg = [dot64(g, g) for g in ours]
    else:  # the entries below the bound only
        tg = [dot64(g, t) for g, t in zip(ours, observed.free)]
        gg = [dot64(g, g.masked_fill(c, 0.0)) for g, c in zip(ours, observed.censored)]
    scale = sum(tg) / max(sum(gg), 1e-300)
    if not (scale > 0 or (signed and scale < 0)) or not math.isfinite(scale):
        return Fit(scale, math.inf)
    # the residual over the entries the scale was fitted on, read off the products: all of it without a clip, a
    # lower bound with one (the entries at the bound only add to it)
    screened = max(_relative(math.sqrt(max(ff - 2 * scale * a + scale * scale * b, 0.0)), math.sqrt(tt))
                   for ff, tt, a, b in zip(observed.free_norms2, observed.norms2, tg, gg))
    if screened > SCREEN_RESIDUAL:
        return Fit(scale, screened)
    worst = 0.0
    for g, t, tt in zip(ours, observed.flat, observed.norms2):
        worst = max(worst, _relative(misfit64(t, g, scale, None if clip is None else clip.cut), math.sqrt(tt)))
    return Fit(scale, worst)


def _relative(diff: float, ref: float) -> float:
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
