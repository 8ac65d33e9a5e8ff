"""The rounding noise an update carries beyond the gradient's own float32 noise, read where it is used, never held.

A FedAvg client rounds ``before - lr * g`` to its dtype: every entry of the weight delta is off by up to
``eps/2 |after| + eps |delta|`` (:meth:`RoundingNoise.of_step`). A known transport error (secure aggregation's
quantization) adds a constant. The noise of an entry is a function of the update's own values, so the attack reads
it from them, a piece at a time, in float64 (:class:`RoundingNoise`): a copy of it would be as large as the update.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from fedleak.nets.float64 import piece_rows
from fedleak.precision import EPS32, carried_dtype, underflow

F64 = torch.float64


@dataclass(frozen=True)
class RoundingNoise:
    """The absolute noise of each entry of an update's tensor:
    ``(|values| * scale + |plus| * plus_scale + error) * factor``, in float64.

    ``values``: the tensor the noise is read from (a weight update's ``after``, or the gradient), in its own dtype
    and never copied whole; ``scale``: a number of machine epsilons of that dtype; ``plus``: a second tensor of the
    same shape the noise grows with (a weight update's change ``before - after``), or None; ``error``: a known
    transport error per entry; ``factor``: a client defense's scale on the tensor, where one is modelled."""

    values: torch.Tensor
    scale: float
    error: float = 0.0
    factor: float = 1.0
    plus: torch.Tensor | None = None
    plus_scale: float = 0.0

    @classmethod
    def of(cls, values: torch.Tensor, epsilons: float, error: float = 0.0) -> RoundingNoise:
        """``epsilons`` machine epsilons of ``values``' dtype times ``|values|``, plus ``error``."""
        return cls(values.detach(), epsilons * float(torch.finfo(values.dtype).eps), float(error))

    @classmethod
    def of_step(cls, after: torch.Tensor, delta: torch.Tensor, error: float = 0.0) -> RoundingNoise:
        """A client's rounding of one SGD step, read from ``before - after``: it computed
        ``after = fl(w - fl(lr * buf))`` with ``buf = fl(g + λ w)`` (``λ = 0`` without weight decay), so each entry
        is off by at most ``eps/2 |after| + eps |delta|`` (``eps`` of the weights' dtype; ``delta`` the change)."""
        eps = float(torch.finfo(after.dtype).eps)
        return cls(after.detach(), eps / 2, float(error), plus=delta.detach(), plus_scale=eps)

    def __mul__(self, factor: float) -> RoundingNoise:
        return replace(self, factor=self.factor * float(factor))

    def on(self, device) -> RoundingNoise:
        """The same noise, read from the values on ``device``."""
        plus = None if self.plus is None else self.plus.to(device=device)
        return replace(self, values=self.values.to(device=device), plus=plus)

    def reordered(self, columns: torch.Tensor) -> RoundingNoise:
        """The noise of a matrix whose columns are this one's, taken in the order ``columns``."""
        plus = None if self.plus is None else self.plus[:, columns.to(self.plus.device)]
        return replace(self, values=self.values[:, columns.to(self.values.device)], plus=plus)

    def read(self, index=...) -> torch.Tensor:
        """The noise of the entries ``index`` selects (float64, a fresh tensor)."""
        out = self.values[index].to(F64, copy=True).abs_()
        if self.scale != 1.0:
            out.mul_(self.scale)
        if self.plus is not None:
            out.add_(self.plus[index].to(F64, copy=True).abs_(), alpha=self.plus_scale)
        if self.error:
            out.add_(self.error)
        if self.factor != 1.0:
            out.mul_(self.factor)
        return out

    def whole(self) -> torch.Tensor:
        """Every entry's noise (float64): for a small tensor (a bias)."""
        return self.read()

    def rows(self, idx) -> torch.Tensor:
        """The noise of rows ``idx`` of a matrix (float64)."""
        return self.read(idx)

    def columns(self, idx) -> torch.Tensor:
        """The noise of columns ``idx`` of a matrix (float64)."""
        return self.read((slice(None), idx))

    def pieces(self) -> Iterator[torch.Tensor]:
        """The noise of a matrix's rows, a piece of rows at a time (float64)."""
        step = piece_rows(*self.values.shape, 0)
        for s in range(0, self.values.shape[0], step):
            yield self.read(slice(s, s + step))

    def row_norms(self) -> torch.Tensor:
        """The norms of a matrix's rows of noise (float64), a piece of rows at a time; where the noise is its values
        as they are and they know their rows' norms (a residual's, :mod:`~fedleak.attacks.exact.residual_noise`),
        those."""
        known = self.values.row_norms() if self.as_is and hasattr(self.values, "row_norms") else None
        return known if known is not None else torch.cat([piece.norm(dim=1) for piece in self.pieces()])

    @property
    def as_is(self) -> bool:
        """Whether the noise is its values as they are."""
        return self.scale == 1.0 and self.plus is None and not self.error and self.factor == 1.0



def step_noises(after: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], error: float = 0.0
                ) -> dict[str, RoundingNoise]:
    """Each tensor of a one-step weight change ``delta`` (``before - after``): its rounding noise
    (:meth:`RoundingNoise.of_step`), plus a known transport ``error``."""
    return {n: RoundingNoise.of_step(after[n], d, error) for n, d in delta.items()}


def gradient_noise(g: torch.Tensor, error: float) -> RoundingNoise:
    """A gradient's noise per entry: 4 epsilons of its dtype (the client's arithmetic), plus, where its values carry a
    format coarser than float32 (:func:`fedleak.precision.carried_dtype`: sent in float16, computed under autocast),
    one epsilon of that format and its underflow, plus a known transport ``error``."""
    noise = RoundingNoise.of(g, 4, error)
    carried = carried_dtype(g)
    if float(torch.finfo(carried).eps) <= EPS32:
        return noise
    own = 4 * float(torch.finfo(g.dtype).eps)
    return replace(noise, scale=own + float(torch.finfo(carried).eps), error=noise.error + underflow(carried))
