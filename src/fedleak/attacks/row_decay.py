"""SGD's weight decay in a first Linear layer's change over any number of local steps, estimated from the units
no sample activated.

With weight decay ``λ`` (``torch.optim.SGD(weight_decay=λ)``, with momentum or not, over any number of steps) each
step adds ``lr λ`` times the current weights to what it subtracts, so a weight's change is its gradient terms plus
a multiple of its starting value, and that multiple is the same for every weight of the layer: the part of the
weights that is their starting value evolves by one scalar recursion, whatever row it sits in. A unit that no
sample activated at any step has no gradient term: its row and bias moved by that multiple of themselves alone.
:func:`read_row_decay` estimates the multiple from such rows (those parallel to their weights; the median of their
ratios), for weights and biases apart (biases left undecayed read as 0), and :func:`peel_row_decay` subtracts it:
a unit that fired for one sample only moves its row by a multiple of that sample's input again.

An estimate, not a bound: over several steps the client's rounding has no bound the server knows. The exact
attack reads one step's decay with a proof (:mod:`fedleak.attacks.exact.decay`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SILENT_TOL = 1e-3  # a silent unit's row change is parallel to its weights within this (relative residual)
AGREE_TOL = 1e-3  # silent units agree on the multiple within this (relative)


@dataclass(frozen=True)
class RowDecay:
    """The multiples of their own starting values by which the layer's weights (``weight``) and biases (``bias``)
    moved on top of their gradient terms, read off ``units`` silent units."""

    weight: float
    bias: float
    units: int

    def describe(self) -> str:
        """The note on the decay peeled."""
        bias = "biases not decayed" if self.bias == 0.0 else f"biases {self.bias:.4g}"
        return (f"weight decay read off {self.units} first-layer unit(s) no sample activated: every weight of the "
                f"layer moved by {self.weight:.4g} times itself ({bias}) on top of its gradient terms; peeled before "
                "the rows were read")


def read_row_decay(G: torch.Tensor, g: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> RowDecay | None:
    """The decay of a layer whose change is ``G``, ``g`` (``before - after``, float64) from weights ``W``, ``b``;
    None where fewer than two units that moved are parallel to their weights and agree on one multiple."""
    norm2 = (W * W).sum(1)
    ratio = (G * W).sum(1) / norm2.clamp_min(1e-300)
    residual = (G - ratio[:, None] * W).norm(dim=1) / G.norm(dim=1).clamp_min(1e-300)
    silent = (G.abs().amax(1) > 0) & (norm2 > 0) & (residual <= SILENT_TOL)
    if int(silent.sum()) < 2:
        return None
    c = float(ratio[silent].median())
    agree = silent & ((ratio - c).abs() <= AGREE_TOL * abs(c))
    if c == 0.0 or int(agree.sum()) < 2:
        return None
    moved = agree & (b != 0)
    cb = float((g[moved] / b[moved]).median()) if bool(moved.any()) else 0.0
    if abs(cb) <= AGREE_TOL * abs(c):
        cb = 0.0  # the biases did not move with their units: not decayed (a parameter group without decay)
    return RowDecay(c, cb, int(agree.sum()))


def peel_row_decay(decay: RowDecay, G: torch.Tensor, g: torch.Tensor, W: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` and ``g`` without the decay: ``G - weight W``, ``g - bias b``."""
    return G - decay.weight * W, g - decay.bias * b
