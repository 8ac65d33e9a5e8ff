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
from fedleak.attacks.zero_sum import zero_sum_breach

SATURATED = ("the output layer's bias gradient has no negative entry: the batch's samples are classified with "
             "probability 1 (the probability of each label rounds to 1 in the client's dtype, so no loss vector has "
             "a negative entry, by which this attack tells a sample's rows), at any batch size; of a one-sample "
             "gradient, attack='first-layer' (or 'auto') reads the first Linear layer instead")
UNKNOWN_SIZE = 1024  # the batch size the rounding of the bias's sum is bounded for where none was reported


def output_bias_cause(net, grads: Mapping[str, torch.Tensor], opts: ExclusivityOptions,
                      noise: Mapping[str, RoundingNoise] | None, reported: int | None, rebuilt: bool) -> str:
    """Why the exact route certified nothing, as the output bias of ``net``'s head tells it (``grads``: the update
    read; ``noise``: its per-entry rounding, a weight change's, where known; ``reported``: the batch size the
    client reported; ``rebuilt``: whether any sample was rebuilt), or empty. A declared defense is read by its own
    rules, and says nothing here."""
    name = net.head.dense[-1].bias_name
    if name is None or name not in grads or opts.defense:
        return ""
    bias = grads[name]
    samples = reported or UNKNOWN_SIZE
    if opts.known_scale:  # a mean loss's samples' scales add up to 1, a summed loss's to the batch size
        mass = 1.0 if opts.loss_reduction == "mean" else (float(reported) if reported else None)
        breach = zero_sum_breach(bias, mass, samples=samples)
    elif noise is not None and name in noise:  # a weight change: its rounding is bounded per entry
        breach = zero_sum_breach(bias, None, samples=samples, bound=noise[name].whole())
    else:
        breach = ""
    if breach:
        return breach
    if not rebuilt and not opts.smoothing and bool((bias >= 0).all()):
        return SATURATED
    return ""
