"""The DLM paper's first defense: clipped, noised transmitted weights (a DP-style FedAvg client).

The client clips its weight change ``Δ = after - before`` row by row (each output unit's incoming weights;
a bias vector counts as one row) to L2 norm ``clip``, then transmits ``before + Δ_clipped + noise`` with
Gaussian (std ``sigma``) or Laplace (scale ``sigma``) noise on every entry. The noise strength ``sigma``
is the defense's parameter. The DLM code also noises the global weights ``before``; the server sent
those itself, so here only what the client transmits is perturbed (noise on both would act like noise of
``sqrt(2)·sigma`` on the update). A :class:`~fedleak.GradientUpdate` is treated the same way (clip rows
of the gradient, add noise).

No calibration to an (ε, δ) guarantee is attempted: this measures how much noise the attacks tolerate.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedleak.errors import FedleakError
from fedleak.updates import GradientUpdate, WeightUpdate

DISTRIBUTIONS = ("gaussian", "laplace")


def clip_rows(t: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every row of ``t`` (first axis; a 1-D tensor is one row) down to L2 norm at most ``clip``."""
    rows = t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True)
    factor = torch.clamp(clip / norms.clamp_min(1e-300), max=1.0)
    return (rows * factor).reshape(t.shape)


def _noise(shape, sigma: float, distribution: str, gen: torch.Generator, dtype) -> torch.Tensor:
    if distribution == "gaussian":
        return sigma * torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
    return (-sigma * torch.sign(u) * torch.log1p(-2 * u.abs())).to(dtype)  # Laplace(0, sigma)


def add_weight_noise(
    update: WeightUpdate | GradientUpdate,
    sigma: float,
    *,
    clip: float | None = None,
    distribution: str = "gaussian",
    seed: int = 0,
) -> WeightUpdate | GradientUpdate:
    """The update a DP-style client would transmit: rows of the change clipped to ``clip`` (``None``:
    no clipping), then noise of strength ``sigma`` (``0``: none) on every transmitted entry."""
    if not (sigma >= 0 and float(sigma) < float("inf")):
        raise FedleakError(f"the noise strength sigma must be a finite number >= 0, got {sigma}")
    if clip is not None and not clip > 0:
        raise FedleakError(f"clip must be positive (or None for no clipping), got {clip}")
    if distribution not in DISTRIBUTIONS:
        raise FedleakError(f"distribution must be one of {DISTRIBUTIONS}, got '{distribution}'")
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(update, GradientUpdate):
        out = {}
        for name, g in update.gradients.items():
            g = clip_rows(g, clip) if clip is not None else g
            out[name] = g + _noise(g.shape, sigma, distribution, gen, g.dtype) if sigma > 0 else g.clone()
        return GradientUpdate(out, num_examples=update.num_examples)
    if not isinstance(update, WeightUpdate):
        raise FedleakError(f"expected a WeightUpdate or GradientUpdate, got {type(update).__name__}")
    after = {}
    for name, b in update.before.items():
        d = update.after[name] - b
        if clip is not None and d.is_floating_point():
            d = clip_rows(d, clip)
        a = b + d
        if sigma > 0:
            a = a + _noise(a.shape, sigma, distribution, gen, a.dtype)
        after[name] = a
    meta = {**dict(update.metadata), "defense": f"weight noise ({distribution}, sigma={sigma:g}, clip={clip})"}
    return replace(update, after=after, metadata=meta)
