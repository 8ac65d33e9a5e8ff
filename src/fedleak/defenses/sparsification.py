"""The DLM paper's second defense: weight (update) sparsification.

The client keeps only the largest-magnitude entries of its change and transmits ``before + Δ_sparse``:
in every tensor the fraction ``sparsity`` of entries of ``Δ = after - before`` with the smallest
magnitude is set to zero (the gradient-pruning defense of DLG, applied to the weight change). The
sparsity (0 = no defense, 0.9 = 90 % of the entries dropped) is the defense's parameter. A
:class:`~fedleak.GradientUpdate` is pruned the same way.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fedleak.errors import FedleakError
from fedleak.updates import GradientUpdate, WeightUpdate


def prune_smallest(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of the entries of ``t`` with the smallest magnitude (ties: by index)."""
    n = t.numel()
    k = int(math.floor(sparsity * n))
    if k <= 0:
        return t.clone()
    flat = t.flatten().clone()
    idx = torch.argsort(flat.abs(), stable=True)[:k]
    flat[idx] = 0
    return flat.reshape(t.shape)


def sparsify_update(update: WeightUpdate | GradientUpdate, sparsity: float) -> WeightUpdate | GradientUpdate:
    """The update a client transmits when it drops the ``sparsity`` fraction of smallest changes per tensor.

    Raises :class:`~fedleak.FedleakError` for a sparsity outside [0, 1) (1 would transmit nothing).
    """
    if not (0 <= sparsity < 1):
        raise FedleakError(f"sparsity must lie in [0, 1), got {sparsity}")
    if isinstance(update, GradientUpdate):
        return GradientUpdate({k: prune_smallest(v, sparsity) for k, v in update.gradients.items()},
                              num_examples=update.num_examples)
    if not isinstance(update, WeightUpdate):
        raise FedleakError(f"expected a WeightUpdate or GradientUpdate, got {type(update).__name__}")
    after = {k: b + prune_smallest(update.after[k] - b, sparsity) for k, b in update.before.items()}
    meta = {**dict(update.metadata), "defense": f"update sparsification ({sparsity:.0%} of entries dropped)"}
    return replace(update, after=after, metadata=meta)
