"""Weight decay in a one-step weight update, read off the units no sample of the batch activated.

SGD with weight decay ``λ`` (``torch.optim.SGD(weight_decay=λ)``, with or without momentum: the first step is the
same) moves every weight by ``lr (g + λ w)``, so the delta is ``lr g + c w`` with ``c = lr λ``, and the ratios
``ΔW_i / Δb_i`` no longer give the input. A unit that no sample activated has no gradient: its incoming row, its
bias and its outgoing column change by ``c w`` alone. :func:`read_decay` finds such units of the head's last ReLU
layer (outgoing column and incoming row parallel to their weights, within the client's rounding) and intersects
the intervals of ``c`` that every entry of them allows; :func:`peel_decay` subtracts ``c w`` from every weight
(and ``c_b b`` from every bias, where the biases were decayed) and bounds each entry's noise.

A gradient with an L2 penalty in the loss (``loss + λ Σ w²``, a regulariser written into the training loop) is
``g + c w`` too (``c = 2λ``), and reads the same way (:mod:`fedleak.attacks.exact.penalty`).

Rounding model: each entry's noise is given (:class:`~fedleak.attacks.exact.noise.RoundingNoise`). For a weight
change the client computes ``after = fl(w - fl(lr * buf))`` with ``buf = fl(g + λ w)``, so each entry of
``before - after`` is off by at most ``eps/2 |after| + eps |Δ|`` (``eps`` of the weights' dtype); a gradient's
entries by a few epsilons of themselves and of the penalty's term. The intervals are a proof under that model and the
assumption that the units read are silent (no sample's term in their rows); the certificate then checks the peeled
update as it checks any other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedleak.attacks.exact.noise import RoundingNoise

F64 = torch.float64
BOUND_ROUND_UP = 1 + 2.0**-18  # a noise bound summed in float32 (a few roundings of 2**-24 each) is raised by this


@dataclass(frozen=True)
class Interval:
    """The values of a decay factor that every entry read allows: ``[lo, hi]``."""

    lo: float
    hi: float

    @property
    def value(self) -> float:
        """The factor subtracted: 0 where the interval holds 0 (no decay seen), else its midpoint."""
        return 0.0 if self.lo <= 0.0 <= self.hi else (self.lo + self.hi) / 2

    @property
    def bound(self) -> float:
        """How far the true factor can be from :attr:`value`."""
        return max(abs(self.lo - self.value), abs(self.hi - self.value))


@dataclass(frozen=True)
class Decay:
    """The decay factors read from ``units`` silent units: ``weight`` for weight tensors (``lr λ``), ``bias`` for
    biases (None where no silent unit has a bias: the biases are then taken as decayed like the weights)."""

    weight: Interval
    bias: Interval | None
    units: int

    @property
    def found(self) -> bool:
        """Whether a decay was seen (a factor whose interval excludes 0)."""
        return self.weight.value != 0.0 or (self.bias is not None and self.bias.value != 0.0)

    def factor(self, is_weight: bool) -> Interval:
        """The factor of a weight tensor, or of a bias."""
        return self.weight if is_weight or self.bias is None else self.bias

    def describe(self) -> str:
        """The attack's note on the decay it peeled."""
        bias = ("biases as the weights" if self.bias is None else "biases not decayed" if self.bias.value == 0.0
                else f"biases {self.bias.value:.4g}")
        return (f"weight decay read off {self.units} unit(s) no sample activated: every weight moved by "
                f"{self.weight.value:.4g} (lr x weight_decay) times itself ({bias}); peeled before the attack")


def intervals(delta: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the bounds of ``c`` with ``|delta - c weight| <= noise`` on every entry (float64 inputs); entries
    whose weight is 0 must have ``|delta| <= noise`` (else the row allows no ``c``: ``lo > hi``)."""
    nz = weight != 0
    a = (delta - noise) / torch.where(nz, weight, 1.0)
    b = (delta + noise) / torch.where(nz, weight, 1.0)
    lo = torch.where(nz, torch.minimum(a, b), -math.inf).amax(-1)
    hi = torch.where(nz, torch.maximum(a, b), math.inf).amin(-1)
    zero_ok = ((delta.abs() <= noise) | nz).all(-1)
    return lo.where(zero_ok, math.inf), hi.where(zero_ok, -math.inf)


def read_decay(net, before: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
               noise: Mapping[str, RoundingNoise]) -> Decay | None:
    """The weight decay of a one-step update ``delta`` (or a gradient's L2 penalty) at weights ``before``, each
    entry off by up to its ``noise``, from the silent units of the head's last ReLU layer; None when no unit there
    is silent (none to read it from), the silent ones show no decay or they disagree."""
    head = net.head
    if head.depth == 0:
        return None
    inner, out = head.dense[-2], head.dense[-1]
    w_out = before[out.weight_name].to(F64)
    d_out = delta[out.weight_name].to(F64)
    noise_out = noise[out.weight_name].whole()
    lo, hi = intervals(d_out.T, w_out.T, noise_out.T)
    cand = torch.nonzero(lo <= hi).flatten()  # outgoing columns parallel to their weights
    if len(cand) == 0 or not bool(d_out[:, cand].any()):
        return None  # none, or only unchanged ones: no decay to read (plain SGD leaves silent units as they were)
    w_in = before[inner.weight_name][cand].to(F64)
    d_in = delta[inner.weight_name][cand].to(F64)
    # the common factor: the median of the candidates' least-squares ratios (silent units agree on it)
    ratios = (d_in * w_in).sum(1) / (w_in * w_in).sum(1).clamp_min(1e-300)
    c = float(ratios.median())
    noise_in = noise[inner.weight_name].rows(cand)
    silent = ((d_in - c * w_in).abs() <= noise_in).all(1)
    if not silent.any():
        return None
    units = cand[silent]
    rlo, rhi = intervals(d_in[silent], w_in[silent], noise_in[silent])
    weight = Interval(max(float(lo[units].max()), float(rlo.max())), min(float(hi[units].min()), float(rhi.min())))
    bias = None
    if inner.bias_name is not None:
        b, db = (t[inner.bias_name][units] for t in (before, delta))
        blo, bhi = intervals(db.to(F64)[None], b.to(F64)[None], noise[inner.bias_name].whole()[units][None])
        bias = Interval(float(blo[0]), float(bhi[0]))
    if weight.lo > weight.hi or (bias is not None and bias.lo > bias.hi):
        return None  # the units read disagree: no one factor explains them
    decay = Decay(weight, bias, len(units))
    return decay if decay.found else None  # factors within rounding of 0: no decay seen


def peel_decay(decay: Decay, before: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
               noise: Mapping[str, RoundingNoise]) -> tuple[dict[str, torch.Tensor], dict[str, RoundingNoise]]:
    """The update without its decay, ``delta - c w``, and each entry's noise: its own ``noise`` (the client's
    rounding and any transport error), the factor's bound times ``|w|`` and the peel's own rounding. Computed in the
    update's dtype:
    ``fl(delta - fl(c w))`` is off by at most ``eps/2 (|c w| + |peeled|)``, and the bound, a sum of non-negative
    terms, is rounded up by ``BOUND_ROUND_UP``. An entry the peel leaves within its bound of zero is set to zero
    (its bound grows by what was dropped): a silent unit's rows are then exactly zero, as without decay."""
    grads, peeled_noise = {}, {}
    for name, d in delta.items():
        factor = decay.factor(before[name].dim() > 1)
        w = before[name].to(d.dtype)
        eps = float(torch.finfo(d.dtype).eps)
        decayed = w * factor.value
        peeled = d - decayed
        bound = noise[name].whole().to(d.dtype)
        bound.add_(w.abs(), alpha=factor.bound).add_(decayed.abs_(), alpha=eps / 2)
        dropped = peeled.abs()
        bound.add_(dropped, alpha=eps / 2).mul_(BOUND_ROUND_UP)
        small = dropped <= bound
        bound = torch.where(small, bound.add(dropped).mul_(BOUND_ROUND_UP), bound)
        grads[name] = peeled.masked_fill_(small, 0.0)
        peeled_noise[name] = RoundingNoise(bound, 1.0)
    return grads, peeled_noise
