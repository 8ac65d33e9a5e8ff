"""What the output layer's bias gradient says about the loss the exact route reads, where nothing was certified.

A softmax cross-entropy's bias gradient sums to zero (:mod:`fedleak.attacks.zero_sum`): one that does not is another
loss's gradient, a regularised or a noised one, which no certificate of this route can explain. One with no negative
entry, where nothing was rebuilt, is a batch the model classifies with probability 1: no sample's loss vector keeps
the negative entry by which the route tells its rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.zero_sum import UNKNOWN_SIZE, zero_sum_breach
from fedleak.precision import Precision

SATURATED = ("the output layer's bias gradient has no negative entry: the batch's samples are classified with "
             "probability 1 (the probability of each label rounds to 1 in the client's dtype, so no loss vector has "
             "a negative entry, by which this attack tells a sample's rows), at any batch size; of a one-sample "
             "gradient, attack='first-layer' (or 'auto') reads the first Linear layer instead")


def output_bias_cause(net, grads: Mapping[str, torch.Tensor], opts: ExclusivityOptions,
                      noise: Mapping[str, RoundingNoise] | None, reported: int | None, rebuilt: bool,
                      precision: Precision) -> str:
    """Why the exact route certified nothing, as the output bias of ``net``'s head tells it (``grads``: the update
    read; ``noise``: its per-entry rounding, a weight change's, where known; ``reported``: the batch size the
    client reported; ``rebuilt``: whether any sample was rebuilt; ``precision``: the format the update's values
    carry, whose rounding the sum may show), or empty. A declared defense is read by its own rules, and says nothing
    here."""
    name = net.head.dense[-1].bias_name
    if name is None or name not in grads or opts.defense:
        return ""
    bias = grads[name]
    # a mean loss's samples' scales add up to 1, a summed loss's to the batch size; a weight change's (or a coarsely
    # sent gradient's) rounding is bounded per entry
    mass = None if not opts.known_scale else 1.0 if opts.loss_reduction == "mean" else reported
    bound = bias.detach().abs().to(torch.float64) * precision.roundoff  # a coarser format's rounding, per entry
    if noise is not None and name in noise:
        bound = bound + noise[name].whole()
    breach = zero_sum_breach(bias, None if mass is None else float(mass), samples=reported or UNKNOWN_SIZE,
                             bound=bound)
    if breach:
        return breach
    if not rebuilt and not opts.smoothing and bool((bias >= 0).all()):
        return SATURATED
    return ""
