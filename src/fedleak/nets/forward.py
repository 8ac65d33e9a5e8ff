"""Per-sample forward and backward passes of a fully connected ReLU network.

These are the quantities of the exclusivity theory (algorithms spec §0): pre-activations ``z_h``,
activations ``a_h``, loss vectors ``e = softmax(o) - onehot(y)`` and backward signals ``delta_h``, for
every sample of a batch separately, computed in a chosen dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.focal import focal_factor
from fedleak.nets.float64 import back64, linear64
from fedleak.nets.head import ReluMLP

MASK_ROWS = 64  # rows of a layer whose ReLU mask is taken at once


@dataclass(frozen=True)
class Trace:
    """Per-sample pass of a batch of ``M`` samples through an MLP with ``H`` hidden layers.

    ``activations[0]`` is the flattened input; ``activations[h]`` (h = 1..H) is hidden layer h's output;
    ``preactivations[h-1]`` its input to the ReLU; ``deltas[h-1]`` the backward signal of hidden layer h
    for the per-sample loss (not divided by M); ``loss_vectors`` is ``e`` (M x K); ``logits`` is ``o``.
    """

    activations: list[torch.Tensor]
    preactivations: list[torch.Tensor]
    logits: torch.Tensor
    loss_vectors: torch.Tensor | None
    deltas: list[torch.Tensor] | None

    def samples(self, idx: torch.Tensor) -> Trace:
        """The trace of the samples ``idx`` only."""
        return Trace([a[idx] for a in self.activations], [z[idx] for z in self.preactivations], self.logits[idx],
                     None if self.loss_vectors is None else self.loss_vectors[idx],
                     None if self.deltas is None else [d[idx] for d in self.deltas])


def forward_trace(
    net: ReluMLP,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    params: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None,
    first: torch.Tensor | None = None,
    smoothing: float = 0.0,
    keep_pre: bool = True,
    focal_gamma: float = 0.0,
) -> Trace:
    """Run the batch through ``net`` sample by sample (vectorised); backward only when labels are given.

    ``params`` (weights, biases) already in ``dtype`` may be passed to avoid converting them again; in float64
    the weights may also be the model's own float32 ones, read in float64 a piece at a time
    (:mod:`fedleak.nets.float64`), as they are read where no ``params`` are given. ``first``: the first layer's
    pre-activations of these inputs where the caller computed them already (the same product, in ``dtype``): the
    pass starts from them. ``smoothing``,
    ``focal_gamma``: the loss's label smoothing, or its focal exponent (:func:`loss_vectors`). ``keep_pre=False``:
    the pre-activations are not kept (the trace's list is empty), each layer's ReLU is taken in place, also on
    ``first``, which the caller hands over: one float64 array of the layer's size fewer per layer.
    """
    if params is None:  # in float64 the weights are read as the model holds them: no float64 copy of the head
        params = (net.weights(net.dense[0].weight.dtype if dtype == torch.float64 else dtype), net.biases(dtype))
    weights, biases = params
    a = inputs.flatten(1).to(device=weights[0].device, dtype=dtype)
    linear = linear64 if dtype == torch.float64 else (lambda x, W: x @ W.T)
    acts, pres = [a], []
    for i, (W, b) in enumerate(zip(weights[:-1], biases[:-1])):
        if i == 0 and first is not None:
            z = first.to(device=a.device, dtype=dtype)
        else:
            z = linear(a, W)
            if b is not None:
                z = z + b
        a = torch.relu(z) if keep_pre else z.relu_()
        pres.append(z if keep_pre else a)  # without keep_pre, the activations: the same ReLU masks
        acts.append(a)
    logits = linear(a, weights[-1])
    if biases[-1] is not None:
        logits = logits + biases[-1]
    kept = pres if keep_pre else []
    if labels is None:
        return Trace(acts, kept, logits, None, None)
    e = loss_vectors(logits, labels, smoothing, focal_gamma)
    return Trace(acts, kept, logits, e, backward_signals(weights, pres, e))


def backward_signals(weights: list[torch.Tensor], pres: list[torch.Tensor], e: torch.Tensor) -> list[torch.Tensor]:
    """The backward signal of every hidden layer for loss vectors ``e`` (one row per sample), given its
    pre-activations ``pres`` (or its activations: only the ReLU's mask ``z > 0`` is read, and ``relu(z) > 0`` is
    the same); float64 signals read the weights in float64 whatever their dtype."""
    deltas, d = [], e
    for W, z in zip(reversed(weights[1:]), reversed(pres)):
        d = back64(d, W) if d.dtype == torch.float64 else d @ W
        for s in range(0, len(d), MASK_ROWS):  # a fresh product: the ReLU's derivative in place, a block of rows
            d[s : s + MASK_ROWS].mul_(z[s : s + MASK_ROWS] > 0)  # at a time (no mask of the whole layer)
        deltas.append(d)
    return deltas[::-1]


#: why a sample that :func:`readable_losses` finds unreadable cannot be rebuilt by the exclusivity attack
SATURATED_SAMPLE = ("the model classifies it with probability 1 (in its dtype), so its loss vector has no negative "
                    "entry and the exclusivity attack reads none of its gradient rows")


def readable_losses(e: torch.Tensor) -> torch.Tensor:
    """Per row of loss vectors ``e``: whether it has a negative entry (its label's, without label smoothing). A
    sample whose probability of its label rounds to 1 in the model's dtype has none: the output-layer columns of
    its gradient rows then read as no sample's, and the exact attack cannot rebuild it, whatever its ExANs."""
    return (e < 0).any(1)


def loss_vectors(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                 focal_gamma: float = 0.0) -> torch.Tensor:
    """``softmax(logits) - target(labels)`` per row: the cross-entropy's gradient with respect to the logits; the
    target is ``onehot(labels)``, or, with label ``smoothing`` ``s`` (``F.cross_entropy(..., label_smoothing=s)``),
    ``(1 - s) onehot(labels) + s / K``. With ``focal_gamma`` above 0, the focal loss's: each row times its factor
    :func:`~fedleak.focal.focal_factor` of ``log p_y``."""
    e = torch.softmax(logits, dim=-1)
    if smoothing:
        e -= smoothing / e.shape[-1]
    rows, labels = torch.arange(e.shape[0], device=e.device), labels.to(e.device).long()
    e[rows, labels] -= 1.0 - smoothing
    if focal_gamma:
        e *= focal_factor(torch.log_softmax(logits, dim=-1)[rows, labels], focal_gamma)[:, None]
    return e
