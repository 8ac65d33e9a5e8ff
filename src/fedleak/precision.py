"""The floating-point precision an update's values carry: their dtype's, or a coarser format every value fits.

A client may send its update in half precision (``float16`` or ``bfloat16``, half the bytes), or compute it under
mixed precision (``torch.autocast``): a weight gradient is then a product in ``bfloat16`` or ``float16``, stored in
the parameter's ``float32`` and holding only values of the coarser format. Either way each value is known to that
format's rounding only (``bfloat16``: 3.9e-3 relative, ``float16``: 4.9e-4 and an absolute 3e-8 below its normal
range), far coarser than the ``float32`` rounding a certificate's witness rows need. The attacks read rows to
within it (their grouping tolerances grow with it) and certify nothing that needs more; the reasons say so.

A ``float32`` tensor is read as carrying a coarser format when every value of a sample of its nonzero entries
(:data:`SAMPLE`, at least :data:`MIN_ENTRIES`) fits that format exactly: a value computed in ``float32`` does so by
chance with probability ``2**-16`` (``bfloat16``) or ``2**-13`` (``float16``), so hundreds of them never do. Values
may fit by their nature, though: inputs of a few bits (sklearn's digits: sixteenths) times one factor per unit (a
class-fished model's, ``-2/M`` at every unit) are short products. An update is read as carrying a coarser format
only where its two largest tensors that can tell both carry it: autocast and a half-precision upload round every
tensor alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: the coarser formats a float32 value may carry, coarsest first (a bfloat16 value in float16's range fits both)
CARRIERS = (torch.bfloat16, torch.float16)
MIN_ENTRIES = 256  # nonzero entries a tensor needs for its format to be read off its values
SAMPLE = 1 << 16  # entries looked at (strided) ...
FIRST_LOOK = 4096  # ... after a first look at this many, which settles a float32 tensor's case
EPS32 = float(torch.finfo(torch.float32).eps)


def carried_dtype(t: torch.Tensor) -> torch.dtype:
    """The floating-point format ``t``'s values carry: its dtype, or (a ``float32`` tensor of at least
    :data:`MIN_ENTRIES` nonzero entries) the coarsest of :data:`CARRIERS` that all of them fit exactly."""
    told = told_dtype(t)
    return t.dtype if told is None else told


def told_dtype(t: torch.Tensor) -> torch.dtype | None:
    """:func:`carried_dtype`, or None where ``t``'s values cannot tell (a ``float32`` tensor with fewer than
    :data:`MIN_ENTRIES` nonzero entries in the sample looked at)."""
    if t.dtype != torch.float32:
        return t.dtype
    if t.numel() < MIN_ENTRIES:
        return None
    fits: list[torch.dtype] | None = None
    for size in (FIRST_LOOK, SAMPLE):  # a float32 tensor shows it in a few entries; a carrier is checked on many
        flat = sample_entries(t, size)
        flat = flat[flat != 0]
        if flat.numel() < MIN_ENTRIES:  # too few values to tell
            fits = None
            continue
        if not bool(torch.isfinite(flat).all()):
            return t.dtype
        fits = [d for d in CARRIERS if torch.equal(flat.to(d).to(torch.float32), flat)]
        if not fits:
            return t.dtype
    return None if fits is None else fits[0]


def sample_entries(t: torch.Tensor, size: int) -> torch.Tensor:
    """About ``size`` entries of ``t`` (flattened), evenly strided, by a stride that shares no factor with its last
    dimension: a stride of a whole row would read one column only (the first pixel of every image: often 0)."""
    flat = t.detach().flatten()
    stride = max(1, flat.numel() // size)
    cols = t.shape[-1] if t.ndim > 1 else 1
    while math.gcd(stride, cols) != 1:
        stride += 1
    return flat[::stride]


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating-point ``dtype``: a value rounded to it is off by at most this, relative
    (within its normal range)."""
    return float(torch.finfo(dtype).eps) / 2


def underflow(dtype: torch.dtype) -> float:
    """The absolute rounding of a value below ``dtype``'s normal range: half its subnormal spacing."""
    info = torch.finfo(dtype)
    return float(info.smallest_normal) * float(info.eps) / 2


@dataclass(frozen=True)
class Precision:
    """The coarsest format an update's values carry (``dtype``), the tensor that carries it (``name``) and the dtype
    it is stored in (``stored``)."""

    dtype: torch.dtype
    name: str = ""
    stored: torch.dtype = torch.float32

    @property
    def coarse(self) -> bool:
        """Whether the values are rounded more coarsely than float32's (float16, bfloat16)."""
        return float(torch.finfo(self.dtype).eps) > EPS32

    @property
    def roundoff(self) -> float:
        """The relative rounding of one value (:func:`unit_roundoff`)."""
        return unit_roundoff(self.dtype)

    def describe(self) -> str:
        """Which format the values carry, in words (empty unless :attr:`coarse`)."""
        if not self.coarse:
            return ""
        fmt = str(self.dtype).removeprefix("torch.")
        if self.stored == self.dtype:
            return f"the update is in {fmt}"
        stored = str(self.stored).removeprefix("torch.")
        return (f"the update is stored in {stored}, but every value read of '{self.name}' fits {fmt} (computed under "
                f"mixed precision, torch.autocast, or sent in {fmt} and read back)")


FLOAT32 = Precision(torch.float32)  # values that carry no coarser format than float32's


def update_precision(tensors: Mapping[str, torch.Tensor]) -> Precision:
    """The coarsest format among ``tensors``': a dtype coarser than float32, else the format that the two largest
    float32 tensors whose values tell (:func:`told_dtype`) both carry, the coarser of the two (a client computing under
    autocast rounds every layer's gradient alike, so two tensors tell, at a tenth of a millisecond; one tensor's
    values may fit a coarser format by their nature, module docstring); float32 when there is none."""
    out = FLOAT32
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    for name, t in floats.items():
        if float(torch.finfo(t.dtype).eps) > float(torch.finfo(out.dtype).eps):
            out = Precision(t.dtype, name, t.dtype)
    singles = sorted(((name, t) for name, t in floats.items() if t.dtype == torch.float32),
                     key=lambda item: item[1].numel(), reverse=True)
    if out.coarse:
        return out
    told: list[tuple[str, torch.dtype]] = []
    for name, t in singles:
        if (dtype := told_dtype(t)) is None:
            continue
        if dtype == torch.float32:  # this tensor's values are float32's: the update's are
            return out
        told.append((name, dtype))
        if len(told) == 2:
            break
    if not told:
        return out
    name, carried = max(told, key=lambda item: float(torch.finfo(item[1]).eps))
    return Precision(carried, name, torch.float32)
