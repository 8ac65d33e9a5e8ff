"""An L2 penalty in the client's loss, read off a gradient's silent units and peeled before the attack.

A client whose loss adds ``λ Σ w²`` (a regulariser written into its training loop) sends ``g + c w`` (``c = 2λ``):
no unit's rows then give an input. A unit that no sample activated has rows ``c w`` alone, and its outgoing column
too, which gives ``c`` within the gradient's rounding (:func:`fedleak.attacks.exact.decay.read_decay`, the reading
of a weight update's decay); subtracting ``c w`` leaves the cross-entropy's gradient, each entry off by a bound the
certificate takes in (:func:`~fedleak.attacks.exact.decay.peel_decay`). The bound adds a few epsilons of ``|c w|``:
the client rounded the data term and the penalty's term apart before adding them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.attacks.exact.decay import Decay, peel_decay, read_decay
from fedleak.attacks.exact.noise import RoundingNoise, gradient_noise
from fedleak.errors import FedleakError
from fedleak.nets.exact_view import exact_view
from fedleak.updates import GradientUpdate

TERM_EPSILONS = 4  # epsilons of |c w| by which the client's separately rounded data term can be off


@dataclass(frozen=True)
class Penalty:
    """A gradient's L2 penalty (``decay``, read as a weight decay), and the gradient without it (``update``), each
    entry off by up to its ``noise``."""

    decay: Decay
    update: GradientUpdate
    noise: dict[str, RoundingNoise]

    def describe(self) -> str:
        """The note on the penalty peeled."""
        d = self.decay
        bias = ("the biases' the same" if d.bias is None else "the biases' not penalised" if d.bias.value == 0.0
                else f"the biases' {d.bias.value:.4g} times themselves")
        return (f"an L2 penalty in the client's loss read off {d.units} unit(s) no sample activated: every weight's "
                f"gradient held {d.weight.value:.4g} times the weight ({bias}; 2 lambda for a loss + lambda sum w^2); "
                "peeled before the attack")


def read_penalty(model: nn.Module, net, update: GradientUpdate, noise: dict[str, RoundingNoise] | None
                 ) -> Penalty | None:
    """The L2 penalty ``update`` (a gradient of ``model``, read as ``net``) holds, where its silent units show one
    (``noise``: its entries' noise where known, else the gradient's own rounding); None without one."""
    grads = update.gradients
    weights = {n: p.detach() for n, p in model.named_parameters() if n in grads}
    if len(weights) < len(grads):
        return None
    if net.head.depth == 0 or any(d.weight_name not in grads for d in net.head.dense):
        return None  # a frozen layer (requires_grad=False) sends no gradient: no unit's rows and column to read
    out = net.head.dense[-1].weight_name
    if bool(((grads[out] == 0).all(0) & (weights[out] != 0).any(0)).any()):
        return None  # a unit's outgoing column untouched: no penalty (it would hold c times the column)
    base = noise if noise is not None else {n: gradient_noise(g, update.error) for n, g in grads.items()}
    decay = read_decay(net, weights, grads, base)
    if decay is None:
        return None
    wide = {n: replace(base[n], plus=weights[n], plus_scale=TERM_EPSILONS * float(torch.finfo(g.dtype).eps)
                       * abs(decay.factor(g.dim() > 1).value)) for n, g in grads.items()}
    peeled, peeled_noise = peel_decay(decay, weights, grads, wide)
    return Penalty(decay, replace(update, gradients=peeled), peeled_noise)


def without_penalty(model: nn.Module, update: GradientUpdate) -> GradientUpdate | None:
    """``update`` without the L2 penalty its silent units show, for what reads a gradient as a cross-entropy's (the
    update's description); None without one, or where the exact methods do not read ``model`` (or read it with
    BatchNorm folded in, whose gradient is another's)."""
    try:
        view = exact_view(model)
        penalty = None if view.fold is not None else read_penalty(view.model, view.net, update, None)
    except FedleakError:
        return None
    return None if penalty is None else penalty.update
