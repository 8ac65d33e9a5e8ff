"""Noise on what a client sends: the Gaussian and the Laplace mechanism, optionally on a norm-clipped update.

* ``gaussian-noise``: clip the whole update to L2 norm ``clip`` (optional), add ``N(0, sigma²)`` to every
  entry. With clipping this is the client-level Gaussian mechanism of DP-FedAvg (McMahan et al., "Learning
  differentially private recurrent language models", ICLR 2018): adding or removing one client changes the
  clipped update by at most ``clip`` in L2 norm, so the noise multiplier is ``sigma / clip`` and Opacus's
  accountant (RDP or PRV) turns ``rounds`` releases at the client sampling rate into (ε, δ).
* ``laplace-noise``: clip the whole update to L1 norm ``clip`` (optional), add ``Laplace(0, scale)`` to every
  entry: the Laplace mechanism (Dwork & Roth, "The algorithmic foundations of differential privacy", 2014),
  pure ``ε = clip / scale`` per release, composed over rounds by basic composition.

Noise is drawn only from the ``generator`` passed to :meth:`apply`; an attacker cannot replay it, so these
filters' forward model (:meth:`~fedleak.defenses.base.UpdateFilter.observe`) is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.defenses.accounting import ACCOUNTANTS, gaussian_epsilon
from fedleak.defenses.base import (
    Accounting,
    ClientBatch,
    Privacy,
    Tensors,
    UpdateFilter,
    check_choice,
    check_open_range,
    register_defense,
)

Sampler = Callable[[torch.Size, torch.dtype, torch.Generator], torch.Tensor]


def clip_total_norm(update: Tensors, bound: float, p: float) -> dict[str, torch.Tensor]:
    """``update`` scaled down as a whole so that the Lp norm of all its floating entries is at most ``bound``."""
    floats = [t for t in update.values() if t.is_floating_point()]
    if not floats:
        return dict(update)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double(), ord=p) for t in floats]), ord=p)
    factor = min(1.0, bound / float(total)) if float(total) > 0 else 1.0
    return {k: t * factor if t.is_floating_point() else t for k, t in update.items()}


def add_noise(update: Tensors, sample: Sampler, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``update`` plus an independent draw of ``sample`` on every floating tensor (dict order; CPU generator)."""
    out = {}
    for name, t in update.items():
        if t.is_floating_point():
            out[name] = t + sample(t.shape, t.dtype, generator).to(t.device)
        else:
            out[name] = t
    return out


def gaussian(sigma: float) -> Sampler:
    def draw(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        return (sigma * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    return draw


def laplace(scale: float) -> Sampler:
    """Laplace(0, scale) by inverting its CDF on a uniform draw."""
    def draw(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).to(dtype)
    return draw


def check_clip(owner: UpdateFilter) -> None:
    if getattr(owner, "clip") is not None:
        check_open_range(owner, "clip", 0.0, float("inf"))


@register_defense
@dataclass(frozen=True)
class GaussianNoise(UpdateFilter):
    """Gaussian noise of std ``sigma`` on every entry, after clipping the whole update to L2 norm ``clip``."""

    name: ClassVar[str] = "gaussian-noise"
    summary: ClassVar[str] = "clip the update to L2 norm `clip` (optional), add N(0, sigma^2) to every entry"
    source: ClassVar[str] = "Gaussian mechanism; DP-FedAvg, McMahan et al. 2018"
    strengths: ClassVar[tuple[dict[str, object], ...]] = (
        {"sigma": 1e-4, "clip": 1.0}, {"sigma": 1e-3, "clip": 1.0}, {"sigma": 1e-2, "clip": 1.0})
    known_function: ClassVar[bool] = False

    sigma: float
    clip: float | None = None
    accountant: str = "rdp"

    def check(self) -> None:
        check_clip(self)
        check_choice(self, "accountant", ACCOUNTANTS)

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        clipped = clip_total_norm(update, self.clip, 2) if self.clip is not None else dict(update)
        return add_noise(clipped, gaussian(self.sigma), generator) if self.sigma > 0 else clipped

    def privacy(self, accounting: Accounting) -> Privacy | None:
        """Client-level (ε, δ) of DP-FedAvg: noise multiplier ``sigma / clip``, ``rounds`` releases, each on a
        Poisson sample of clients at ``client_rate``; None without clipping (unbounded sensitivity)."""
        if self.clip is None:
            return None
        z = self.sigma / self.clip
        eps = gaussian_epsilon(z, accounting.client_rate, accounting.rounds, accounting.delta, self.accountant)
        return Privacy(epsilon=eps, delta=accounting.delta, unit="client", accountant=f"opacus-{self.accountant}",
                       mechanism=f"Gaussian mechanism on the update clipped to L2 norm {self.clip:g} "
                                 f"(noise multiplier {z:g}), {accounting.rounds} round(s) at client rate "
                                 f"{accounting.client_rate:g}")


@register_defense
@dataclass(frozen=True)
class LaplaceNoise(UpdateFilter):
    """Laplace noise of scale ``scale`` on every entry, after clipping the whole update to L1 norm ``clip``."""

    name: ClassVar[str] = "laplace-noise"
    summary: ClassVar[str] = "clip the update to L1 norm `clip` (optional), add Laplace(0, scale) to every entry"
    source: ClassVar[str] = "Laplace mechanism, Dwork & Roth 2014"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"scale": 1e-4}, {"scale": 1e-3}, {"scale": 1e-2})
    known_function: ClassVar[bool] = False

    scale: float
    clip: float | None = None

    def check(self) -> None:
        check_clip(self)

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        clipped = clip_total_norm(update, self.clip, 1) if self.clip is not None else dict(update)
        return add_noise(clipped, laplace(self.scale), generator) if self.scale > 0 else clipped

    def privacy(self, accounting: Accounting) -> Privacy | None:
        """Pure client-level ε = rounds · clip / scale (sensitivity ``clip`` in L1, basic composition, every
        round counted: no amplification by sampling is claimed); None without clipping."""
        if self.clip is None:
            return None
        eps = accounting.rounds * self.clip / self.scale if self.scale > 0 else float("inf")
        return Privacy(epsilon=eps, delta=0.0, unit="client", accountant="basic composition",
                       mechanism=f"Laplace mechanism on the update clipped to L1 norm {self.clip:g} "
                                 f"(scale {self.scale:g}), {accounting.rounds} round(s)")
