"""A softmax cross-entropy's gradient at the output layer's bias sums to zero over the classes.

Each sample's loss vector ``p - t`` sums to zero: ``p`` is a softmax and ``t`` its target, one-hot or smoothed, and a
class weight or a per-sample factor scales the whole vector. So the output bias's gradient, a sum of such vectors,
sums to zero whatever the labels, the label smoothing, the class weights or the batch's scale, up to the client's
rounding. An update whose bias sums away from zero is not such a gradient as it stands: another loss over the logits
(``BCEWithLogitsLoss`` on one-hot or multi-hot targets, MSE), a regulariser in the loss (an L2 penalty), or noise.
:func:`zero_sum_breach` tells it from the rounding and says so.
"""

from __future__ import annotations

import torch

SUM_TOL = 1e-3  # relative to the bias's norm: beyond any float rounding of a handful of classes
ROUNDING_EPSILONS = 8  # epsilons of the update's dtype per class and per sample that rounding can leave in the sum
UNKNOWN_SIZE = 1024  # the batch size the rounding of the bias's sum is bounded for where none was reported


def relative_sum(bias: torch.Tensor) -> float:
    """The sum of ``bias``'s entries over their norm (0 for a zero tensor), in float64."""
    b = bias.detach().to(torch.float64).flatten()
    norm = float(b.norm())
    return float(b.sum()) / norm if norm > 0 else 0.0


def zero_sum_breach(bias: torch.Tensor, mass: float | None, *, samples: int = 1,
                    bound: torch.Tensor | None = None) -> str:
    """Why ``bias`` (the output layer's bias gradient, any dtype) is no softmax cross-entropy gradient, in words, or
    empty where its sum is within rounding of zero. ``mass``: the total of the samples' scales (1 for a mean loss,
    the batch size for a summed one), which bounds the rounding a saturated softmax leaves (every sample classified
    with probability 1: the bias is then all tiny positive entries); None where it is unknown and ``bound`` is not
    given: nothing is claimed. ``samples``: the batch size, or an upper bound on it; ``bound``: a bound on each
    entry's rounding (a weight change's; a gradient's sent in a coarser format), allowed on top of ``mass``'s."""
    b = bias.detach().to(torch.float64).flatten()
    norm = float(b.norm())
    if norm == 0.0 or not bool(torch.isfinite(b).all()):
        return ""
    total = relative_sum(b) * norm
    if bound is None and mass is None:
        return ""
    allowed = 0.0 if bound is None else float(bound.detach().to(torch.float64).sum())
    if mass is not None:
        eps = float(torch.finfo(bias.dtype).eps) if bias.dtype.is_floating_point else 0.0
        allowed += ROUNDING_EPSILONS * eps * mass * (b.numel() + 2 * max(1, samples))
    if abs(total) <= max(SUM_TOL * norm, allowed):
        return ""
    return (f"the output layer's bias gradient sums to {total / norm:.3g} of its norm, where a softmax "
            "cross-entropy's sums to 0 whatever its labels, label smoothing, class weights or scale: the update is "
            "not that loss's gradient (another loss over the logits, such as BCEWithLogitsLoss on one-hot or "
            "multi-hot targets or MSE; a regulariser in the loss, such as an L2 penalty; or noise), which the exact "
            "route reads only as a cross-entropy")
