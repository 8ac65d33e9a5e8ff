"""Sparsification of what a client sends: global top-k, and per-tensor gradient pruning.

* ``top-k``: keep the ``ratio`` fraction of entries with the largest magnitude over the whole update, zero the
  rest, and send the survivors as (index, value) pairs: the compression of Deep Gradient Compression (Lin et
  al., ICLR 2018), whose sparsity pattern is the side channel OLIVE (Kato et al.) reads.
* ``gradient-pruning``: in every tensor, zero the ``ratio`` fraction of entries with the smallest magnitude:
  the defense evaluated by Deep Leakage from Gradients (Zhu et al., NeurIPS 2019).

Both keep exactly ``k`` entries, ties in magnitude broken by position (the earlier entry of the flattened
update, in its key order, is kept). Their forward model for a defense-aware attack uses both things the attacker
sees: where an entry was sent it must match; where it was dropped it was no larger than the smallest entry sent
(the threshold: over the whole update for top-k, per tensor for pruning), so only a simulated entry beyond the
threshold is penalised there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.defenses.base import (
    ClientBatch,
    Tensors,
    UpdateFilter,
    check_open_range,
    register_defense,
)
from fedleak.errors import OptionError
from fedleak.validation import describe

INDEX_BYTES = 4  # a sparse entry is sent as an int32 index ...
VALUE_BYTES = 4  # ... and a float32 value


def exact(x: float) -> float:
    """``ratio * n`` without its floating-point error (``0.29 * 100`` is 28.999999999999996): 29."""
    return round(x, 6)


def keep_largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The boolean mask of the ``k`` largest entries of the 1-D tensor ``magnitudes`` (ties: lower index kept)."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    threshold = torch.kthvalue(magnitudes, n - k + 1).values  # the k-th largest
    above = magnitudes > threshold
    at = magnitudes == threshold
    room = k - int(above.sum())
    return above | (at & (torch.cumsum(at, 0) <= room))


def smallest_sent(t: torch.Tensor) -> float:
    """The smallest magnitude among the nonzero entries of ``t`` (``inf`` when nothing was sent)."""
    sent = t[t != 0]
    return float(sent.abs().min()) if sent.numel() else math.inf


def below_threshold(observed: Tensors, name: str, simulated: torch.Tensor, threshold: float) -> torch.Tensor:
    """The forward model of a magnitude sparsifier: ``simulated`` where ``observed[name]`` was sent, and where it
    was dropped only the part of ``simulated`` beyond ``±threshold`` (a dropped entry was at most that large);
    ``simulated`` unchanged where nothing was observed."""
    seen = observed.get(name)
    if seen is None or not simulated.is_floating_point():
        return simulated
    kept = (seen != 0).to(simulated.dtype)
    excess = simulated - simulated.clamp(-threshold, threshold) if math.isfinite(threshold) else 0 * simulated
    return simulated * kept + excess * (1 - kept)


def dense_bytes(t: torch.Tensor) -> int:
    return int(t.numel()) * (VALUE_BYTES if t.is_floating_point() else t.element_size())


@register_defense
@dataclass(frozen=True)
class TopK(UpdateFilter):
    """Keep the ``ratio`` fraction (``ceil(ratio * n)``, at least one) of the largest-magnitude entries of the
    whole update, zero the rest."""

    name: ClassVar[str] = "top-k"
    summary: ClassVar[str] = "keep the `ratio` fraction of largest-magnitude entries of the whole update"
    source: ClassVar[str] = "Deep Gradient Compression, Lin et al. 2018 (OLIVE's side channel, Kato et al.)"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"ratio": 0.1}, {"ratio": 0.01}, {"ratio": 0.001})

    ratio: float

    def check(self) -> None:
        check_open_range(self, "ratio", 0.0, 1.0, closed_high=True)

    def kept(self, n: int) -> int:
        """How many of ``n`` entries are kept."""
        return min(n, max(1, math.ceil(exact(self.ratio * n))))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        names = [k for k, t in update.items() if t.is_floating_point()]
        if not names:
            return dict(update)
        flat = torch.cat([update[k].detach().abs().flatten().double() for k in names])
        keep = keep_largest(flat, self.kept(flat.numel()))
        out = dict(update)
        for name, mask in zip(names, torch.split(keep, [update[k].numel() for k in names])):
            t = update[name]
            out[name] = t * mask.reshape(t.shape).to(t.dtype)
        return out

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        threshold = min((smallest_sent(t) for t in observed.values() if t.is_floating_point()), default=math.inf)
        return {k: below_threshold(observed, k, t, threshold) for k, t in simulated.items()}

    def encoded_bytes(self, sent: Tensors) -> int | None:
        """(4-byte index, 4-byte value) per nonzero entry sent (at most the ``k`` kept)."""
        floats = [t for t in sent.values() if t.is_floating_point()]
        n = sum(int(t.numel()) for t in floats)
        nonzero = sum(int(torch.count_nonzero(t)) for t in floats)
        other = sum(dense_bytes(t) for t in sent.values() if not t.is_floating_point())
        return min(nonzero, self.kept(n)) * (INDEX_BYTES + VALUE_BYTES) + other


@register_defense
@dataclass(frozen=True)
class GradientPruning(UpdateFilter):
    """In every tensor, zero the ``ratio`` fraction (``floor(ratio * n)``) of entries with the smallest
    magnitude."""

    name: ClassVar[str] = "gradient-pruning"
    summary: ClassVar[str] = "zero the `ratio` fraction of smallest-magnitude entries of every tensor"
    source: ClassVar[str] = "Deep Leakage from Gradients, Zhu et al. 2019"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"ratio": 0.5}, {"ratio": 0.9}, {"ratio": 0.99})

    ratio: float

    def check(self) -> None:
        if not (0 <= self.ratio < 1):
            raise OptionError(f"option ratio of defense '{self.name}' must lie in [0, 1) (the fraction of entries "
                              f"zeroed; 1 would send nothing), got {describe(self.ratio)}")

    def dropped(self, n: int) -> int:
        """How many of a tensor's ``n`` entries are zeroed."""
        return math.floor(exact(self.ratio * n))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = dict(update)
        for name, t in update.items():
            if t.is_floating_point() and t.numel() > 0:
                keep = keep_largest(t.detach().abs().flatten(), t.numel() - self.dropped(t.numel()))
                out[name] = t * keep.reshape(t.shape).to(t.dtype)
        return out

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        return {k: below_threshold(observed, k, t, smallest_sent(observed[k]) if k in observed else math.inf)
                for k, t in simulated.items()}

    def encoded_bytes(self, sent: Tensors) -> int | None:
        """The cheaper of dense float32 and (4-byte index, 4-byte value) per nonzero entry."""
        dense = sum(dense_bytes(t) for t in sent.values())
        nonzero = sum(int(torch.count_nonzero(t)) for t in sent.values())
        return min(dense, nonzero * (INDEX_BYTES + VALUE_BYTES))
