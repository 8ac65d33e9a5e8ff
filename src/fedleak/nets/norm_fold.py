"""What folding an eval-mode ``BatchNorm1d`` into a ``Linear`` layer takes, whichever side of the layer it is on: the
norm's affine map from its running statistics, and the twin ``Linear`` layer that computes both."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.nets.layers import BatchNorm

F64 = torch.float64


class ScaledRows:
    """What the folds that scale a layer's rows (or columns) by a per-unit ``scale`` share: the twin's entries are
    computed from the user's (a quotient, rounded once), and grow by at most ``1 / |scale|``; no column moves."""

    columns = None  # the twin's columns are the user's, in their order
    rounds = True  # the twin's entries are quotients of the user's, each rounded once

    @property
    def row_gain(self) -> float:
        """The most a folded row's entries grow by on the way to the twin's (``max 1 / |scale|``, at least 1): what a
        bound on the user's entries is multiplied by to bound the twin's."""
        return max(1.0, float(self.scale.abs().reciprocal().max()))


@dataclass(frozen=True)
class NormAffine:
    """An eval-mode ``BatchNorm1d`` as ``u = scale x + shift`` per unit, with its running ``mean`` and ``std``
    (``sqrt(var + eps)``), float64."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def norm_affine(name: str, bn: nn.BatchNorm1d, zero_gamma: str) -> NormAffine:
    """``bn``'s affine map; :class:`ModelError` where a unit has ``gamma = 0`` (its rows cannot be read through the
    fold, which divides by its scale): ``zero_gamma`` says what that does, after the units."""
    scale, shift = BatchNorm(name, bn, None, None).affine(F64)
    if bool((scale == 0).any()):
        units = torch.nonzero(scale == 0).flatten().tolist()[:5]
        raise ModelError(f"BatchNorm1d '{name}' has gamma = 0 on unit(s) {units}: {zero_gamma}; 'first-layer', "
                         "'auto' and the optimisation attacks still apply")
    std = torch.sqrt(bn.running_var.detach().to(F64) + bn.eps)
    return NormAffine(scale, shift, bn.running_mean.detach().to(F64), std)


def linear_twin(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None,
                bias_trained: bool | None = None) -> nn.Linear:
    """A ``Linear`` layer shaped as ``lin``, with ``weight`` and ``bias`` (None: none; each rounded once to its dtype),
    its weight trained where ``lin``'s is, its bias where ``bias_trained`` says (None: where ``lin``'s is)."""
    out = nn.Linear(lin.in_features, lin.out_features, bias=bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(lin.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(bias_trained if bias_trained is not None else
                                lin.bias is not None and lin.bias.requires_grad)
    return out
