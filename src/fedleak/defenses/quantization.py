"""Quantisation of what a client sends: QSGD, deterministic uniform quantisation, half precision and sign compression.

* ``qsgd``: QSGD (Alistarh et al., "QSGD: communication-efficient SGD via gradient quantization and encoding",
  NeurIPS 2017): per tensor ``v``, entry ``i`` is sent as ``‖v‖₂ · sign(v_i) · ξ_i`` with ``ξ_i`` one of the
  neighbouring levels ``l/s, (l+1)/s`` around ``|v_i| / ‖v‖₂``, the upper one with probability
  ``|v_i| s / ‖v‖₂ - l``: unbiased, ``E[sent] = v``.
* ``quantize``: deterministic symmetric uniform quantisation to ``bits`` bits per tensor (scale
  ``max|v| / (2^(bits-1) - 1)``, round to nearest), as in low-precision federated updates.
* ``half-precision``: every entry rounded to ``float16`` or ``bfloat16`` (a compressed upload, or what a client
  computing under ``torch.autocast`` sends).
* ``sign``: signSGD (Bernstein et al., "signSGD: compressed optimisation for non-convex problems", ICML 2018),
  with ``scale="mean"`` the scaled sign of Karimireddy et al. ("Error feedback fixes SignSGD", ICML 2019):
  ``sign(v) · mean|v|`` per tensor, so that averaging clients keeps the update's scale.

Their forward models for a defense-aware attack: QSGD is random and unbiased, so the identity; the two
deterministic maps are piecewise constant, so a straight-through estimator (the quantised value forward, the
identity backward) with the scale ``quantize`` revealed read from the observed update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedleak.defenses.base import (
    ClientBatch,
    Tensors,
    UpdateFilter,
    check_choice,
    register_defense,
)
from fedleak.errors import OptionError
from fedleak.validation import describe

SCALE_BYTES = 4  # a per-tensor float32 (a norm or a scale) sent next to the codes


def each_float(update: Tensors, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``fn(name, tensor)`` on every floating tensor of ``update``; the others as they are."""
    return {k: fn(k, t) if t.is_floating_point() else t for k, t in update.items()}


def packed_bytes(sent: Tensors, bits_per_entry: int) -> int:
    """Per tensor: ``bits_per_entry`` bits per entry rounded up to bytes, plus one float32 scale."""
    return sum(math.ceil(int(t.numel()) * bits_per_entry / 8) + SCALE_BYTES for t in sent.values())


def straight_through(simulated: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """``quantised`` forward, the identity backward (the straight-through estimator)."""
    return simulated + (quantised - simulated).detach()


def qsgd(t: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """One QSGD draw of ``t`` with ``levels`` levels (``s`` in the paper)."""
    v = t.detach().double()
    u = torch.rand(v.shape, generator=generator, dtype=torch.float64).to(v.device)
    norm = torch.linalg.vector_norm(v)
    if float(norm) == 0:
        return torch.zeros_like(t)
    r = v.abs() / norm * levels
    low = torch.floor(r)
    xi = (low + (u < r - low).double()) / levels
    return (norm * torch.sign(v) * xi).to(t.dtype)


def uniform_quantise(t: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """``round(t / scale)`` clamped to ``[-qmax, qmax]``, times ``scale``; zero where ``scale`` is 0."""
    if float(scale) == 0:
        return torch.zeros_like(t)
    v = t.detach().double()
    return (torch.round(v / scale).clamp(-qmax, qmax) * scale).to(t.dtype)


@register_defense
@dataclass(frozen=True)
class QSGD(UpdateFilter):
    """QSGD's unbiased stochastic quantisation to ``levels`` levels per tensor."""

    name: ClassVar[str] = "qsgd"
    summary: ClassVar[str] = "per tensor, unbiased stochastic quantisation of |v_i|/||v|| to `levels` levels"
    source: ClassVar[str] = "QSGD, Alistarh et al. 2017"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"levels": 16}, {"levels": 4}, {"levels": 1})
    known_function: ClassVar[bool] = False

    levels: int = field(metadata={"low": 1})

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return each_float(update, lambda _, t: qsgd(t, self.levels, generator))

    def encoded_bytes(self, sent: Tensors) -> int | None:
        """Per tensor a float32 norm, and per entry a sign bit and ``ceil(log2(levels + 1))`` bits of level."""
        return packed_bytes(sent, 1 + int(self.levels).bit_length())


@register_defense
@dataclass(frozen=True)
class Quantize(UpdateFilter):
    """Deterministic symmetric uniform quantisation to ``bits`` bits per tensor."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "per tensor, round to `bits`-bit symmetric uniform levels (scale max|v|/(2^(bits-1)-1))"
    source: ClassVar[str] = "symmetric per-tensor uniform (int8 / int4) quantisation, QSGD's deterministic counterpart"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"bits": 8}, {"bits": 4})

    bits: int

    def check(self) -> None:
        if not 2 <= self.bits <= 16:
            raise OptionError(f"option bits of defense '{self.name}' must lie in [2, 16], got {describe(self.bits)}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scale_of(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().abs().max() / self.qmax

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return each_float(update, lambda _, t: uniform_quantise(t, self.scale_of(t), self.qmax))

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        """Straight-through quantisation of ``simulated`` at the scale each observed tensor reveals
        (its ``max|.| / qmax``)."""
        def one(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in observed:
                return t
            return straight_through(t, uniform_quantise(t, self.scale_of(observed[name]), self.qmax))
        return each_float(simulated, one)

    def encoded_bytes(self, sent: Tensors) -> int | None:
        return packed_bytes(sent, self.bits)


HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` (round to nearest even) and read back in its own dtype."""
    return t.detach().to(dtype).to(t.dtype)


@register_defense
@dataclass(frozen=True)
class HalfPrecision(UpdateFilter):
    """Every entry rounded to ``float16`` or ``bfloat16``: half the bytes, as a compressed upload sends it. What the
    server reads back (float32 tensors of half-precision values) is what a client computing under ``torch.autocast``
    sends too (:mod:`fedleak.precision` tells both)."""

    name: ClassVar[str] = "half-precision"
    summary: ClassVar[str] = "round every entry to float16 or bfloat16 (`dtype`): half the bytes"
    source: ClassVar[str] = "half-precision uploads, as mixed-precision training (torch.autocast) computes them"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"dtype": "float16"}, {"dtype": "bfloat16"})

    dtype: str = "float16"

    def check(self) -> None:
        check_choice(self, "dtype", tuple(HALF_DTYPES))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return each_float(update, lambda _, t: rounded_to(t, HALF_DTYPES[self.dtype]))

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        """Straight-through rounding of ``simulated`` to the dtype."""
        return each_float(simulated, lambda _, t: straight_through(t, rounded_to(t, HALF_DTYPES[self.dtype])))

    def encoded_bytes(self, sent: Tensors) -> int | None:
        return sum(2 * int(t.numel()) for t in sent.values())


SIGN_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor | float]] = {
    "mean": lambda t: t.abs().mean(),
    "none": lambda t: 1.0,
}


@register_defense
@dataclass(frozen=True)
class Sign(UpdateFilter):
    """signSGD: the sign of every entry, times the tensor's mean magnitude (``scale="mean"``) or 1 (``"none"``).

    An entry that is exactly 0 is sent as 0 (``torch.sign``).
    """

    name: ClassVar[str] = "sign"
    summary: ClassVar[str] = "sign of every entry, times the tensor's mean |v| (scale=mean) or 1 (scale=none)"
    source: ClassVar[str] = "signSGD, Bernstein et al. 2018; scaled sign, Karimireddy et al. 2019"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"scale": "mean"}, {"scale": "none"})

    scale: str = "mean"

    def check(self) -> None:
        check_choice(self, "scale", tuple(SIGN_SCALES))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        factor = SIGN_SCALES[self.scale]
        return each_float(update, lambda _, t: torch.sign(t) * factor(t.detach()))

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        """Straight-through sign of ``simulated`` times its own mean magnitude (differentiable) or 1."""
        factor = SIGN_SCALES[self.scale]
        return each_float(simulated, lambda _, t: straight_through(t, torch.sign(t.detach())) * factor(t))

    def encoded_bytes(self, sent: Tensors) -> int | None:
        return packed_bytes(sent, 1)
