"""Matching objectives between a simulated update ``u`` and the observed one ``u*``, and total variation.

``Σ`` runs over all parameter tensors:

* ``l2``: ``Σ‖u(x') − u*‖² / Σ‖u*‖²`` (DLG; for weight updates ``u`` carries the learned learning rate,
  which is DLM's objective with ``η`` in place of ``1/k``);
* ``normalized``: ``Σ_l ‖u_l/ν(u) − u*_l/ν(u*)‖²`` with ``ν`` the mean per-layer norm (DLM+);
* ``cosine``: ``1 − ⟨u, u*⟩/(‖u‖‖u*‖)`` (Inverting Gradients, which adds ``α·TV(x')``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _layer_mean_norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return sum(t.norm() for t in ts) / len(ts)


class Objective:
    """A matching objective against a fixed target update; target statistics are computed once."""

    def __init__(self, target: list[torch.Tensor]):
        self.target = target
        self.sq_norm = sum(float((t * t).sum()) for t in target)
        self.mean_layer_norm = float(_layer_mean_norm(target))

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class L2Objective(Objective):
    """``Σ‖u − u*‖² / Σ‖u*‖²`` (DLG; DLM with the learned learning rate inside ``u``)."""

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        return sum(((s - t) ** 2).sum() for s, t in zip(sim, self.target)) / max(self.sq_norm, 1e-300)


class NormalizedObjective(Objective):
    """``Σ_l ‖u_l/ν(u) − u*_l/ν(u*)‖²`` with ``ν`` the mean per-layer norm (DLM+)."""

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        ns = _layer_mean_norm(sim).clamp_min(1e-30)
        return sum(((s / ns - t / self.mean_layer_norm) ** 2).sum() for s, t in zip(sim, self.target))


class CosineObjective(Objective):
    """``1 − ⟨u, u*⟩ / (‖u‖ ‖u*‖)`` over all parameters at once (Inverting Gradients).

    Computed as ``½ ‖u/‖u‖ − u*/‖u*‖‖²`` (the same value): without the cancellation of ``1 − cos``, it is
    accurate to float precision near a match too, where ``1 − cos`` in float32 is rounding noise of ~1e-7.
    """

    def __init__(self, target: list[torch.Tensor]):
        super().__init__(target)
        scale = 1.0 / max(math.sqrt(self.sq_norm), 1e-300)
        self.unit = [t * scale for t in target]

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        ns = torch.sqrt(sum((s * s).sum() for s in sim)).clamp_min(1e-30)
        return 0.5 * sum(((s / ns - t) ** 2).sum() for s, t in zip(sim, self.unit))


OBJECTIVES: dict[str, type[Objective]] = {
    "l2": L2Objective,
    "normalized": NormalizedObjective,
    "cosine": CosineObjective,
}


def total_variation(x: torch.Tensor, boundary: str = "zero") -> torch.Tensor:
    """Anisotropic total variation: mean over pixels of ``|x[i+1,j]-x[i,j]| + |x[i,j+1]-x[i,j]|``.

    ``boundary="zero"`` treats the pixels past the last row/column as 0 (the image sits on a black
    background, which also penalises bright borders; this is the convention of the Inverting Gradients
    reference code), ``"none"`` only counts differences inside the image. 0 for non-image inputs.
    """
    if x.ndim < 4:
        return x.new_zeros(())
    if boundary == "zero":
        p = nn.functional.pad(x, (0, 1, 0, 1))
        dx = (p[..., :-1, 1:] - p[..., :-1, :-1]).abs()
        dy = (p[..., 1:, :-1] - p[..., :-1, :-1]).abs()
        return (dx + dy).mean()
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
