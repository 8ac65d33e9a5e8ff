"""The noise of each entry of a residual update peeling leaves, read where it is used, never held.

A residual entry is ``rescale (g - t)`` (:func:`fedleak.attacks.exact.peeling.residual_update`): the update's entry
``g`` less the certified samples' terms ``t`` (float64 autograd), rounded to the update's dtype. Its noise is the
update's own, rescaled, plus 4 epsilons of the update's dtype on ``|t|`` (the client's sum rounded the terms with
the rest) and half an epsilon of the residual for its own rounding:
``rescale (own + 4 eps |t|) + eps/2 |residual|``, zero on a row peeling silenced (the certified samples' alone).
Held as a tensor it would be as large as the update; :class:`ResidualNoise` reads it from the update's own noise,
the stored residual and the terms, a streamed weight's formed for just the entries read
(:class:`~fedleak.attacks.exact.batch_gradient.SummedProducts`), as :class:`~fedleak.attacks.exact.noise.
RoundingNoise` reads its ``values``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fedleak.attacks.exact.batch_gradient import SummedProducts
from fedleak.attacks.exact.noise import RoundingNoise

F64 = torch.float64
HELD_ENTRIES = 1 << 16  # terms of a tensor up to this size are held as they are (float64; a bias's)


@dataclass(frozen=True, eq=False)
class ResidualNoise:
    """The noise bound of each entry of one tensor of a residual update (module docstring), indexed like a tensor
    (rows, ``(slice(None), columns)`` or ``...``), float64: ``residual`` (the stored residual, in the update's
    dtype), ``own`` (the update's noise of the tensor), ``terms`` (the certified samples' terms, float64, a tensor
    or a streamed weight's products), ``rescale`` (the residual's scale over the update's), ``live`` (float64, 1 on
    a row that holds samples left, 0 on a silent one; None: every row)."""

    residual: torch.Tensor
    own: RoundingNoise
    terms: torch.Tensor | SummedProducts
    rescale: float
    live: torch.Tensor | None = None
    norms: torch.Tensor | None = None  # a matrix's rows' noise norms, where its maker computed them (float64)
    # rows read one by one (a witness row is read by several checks), up to a sixteenth of the matrix's rows
    memo: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> torch.Size:
        return self.residual.shape

    @property
    def dtype(self) -> torch.dtype:
        """The update's dtype (the format its values carry)."""
        return self.residual.dtype

    @property
    def device(self) -> torch.device:
        return self.residual.device

    def to(self, device=None) -> ResidualNoise:
        """The same noise, read on ``device``."""
        live = None if self.live is None else self.live.to(device)
        return replace(self, residual=self.residual.to(device), own=self.own.on(device), live=live)

    def silenced(self, rows: torch.Tensor, norms: torch.Tensor | None = None) -> ResidualNoise:
        """The same noise with ``rows`` silent (zero), with its rows' ``norms`` (before silencing) where known."""
        rows = rows.to(self.device)
        live = torch.ones(self.shape[0], dtype=F64, device=self.device) if self.live is None else self.live.clone()
        norms = None if norms is None else norms.to(self.device).index_fill(0, rows, 0.0)
        return replace(self, live=live.index_fill_(0, rows, 0.0), norms=norms, memo={})

    def row_norms(self) -> torch.Tensor | None:
        """A matrix's rows' noise norms where known (float64), else None."""
        return self.norms

    def __getitem__(self, index) -> torch.Tensor:
        """The noise of the entries ``index`` selects (:meth:`read`); rows selected by their numbers are kept (up to
        a sixteenth of the matrix's rows) and read once."""
        if isinstance(index, (list, torch.Tensor)) and len(self.memo) < self.shape[0] // 16:
            rows = torch.as_tensor(index)
            if rows.dtype == torch.bool:  # a mask, not row numbers
                return self.read(index)
            rows = rows.reshape(-1).tolist()
            new = sorted(set(rows).difference(self.memo))
            if new:
                self.memo.update(zip(new, self.read(new)))
            return torch.stack([self.memo[r] for r in rows]) if rows else self.read(index)
        return self.read(index)

    def read(self, index, terms: torch.Tensor | None = None) -> torch.Tensor:
        """The noise of the entries ``index`` selects (float64, a fresh tensor); ``terms``: the terms' entries there
        where the caller has them at hand (else they are read)."""
        eps = float(torch.finfo(self.residual.dtype).eps)
        taken = (self.terms[index] if terms is None else terms).to(device=self.device, dtype=F64).abs()
        out = self.own.read(index).add_(taken, alpha=4 * eps).mul_(self.rescale)
        out.add_(self.residual[index].abs().to(F64), alpha=eps / 2)  # (powers of two: exact products)
        if self.live is not None:
            live = self.live[index[0] if isinstance(index, tuple) else index]
            out.mul_(live if out.dim() == 1 else live[:, None])
        return out

    def noise(self) -> RoundingNoise:
        """As the attack reads an update's noise (:class:`~fedleak.attacks.exact.noise.RoundingNoise`)."""
        return RoundingNoise(self, 1.0)


def held_terms(terms: torch.Tensor) -> torch.Tensor:
    """Terms a tensor's autograd gave whole (float64), as :class:`ResidualNoise` holds them: as they are where small
    (a bias's); else (a weight its model reads other than through ``F.linear``, not streamed) their magnitudes in
    float32, rounded up (the noise reads only ``|t|``): half the size of the float64 terms."""
    if terms.numel() <= HELD_ENTRIES:
        return terms
    size = terms.abs()
    low = size.to(torch.float32)
    return torch.where(low.to(F64) < size, torch.nextafter(low, torch.tensor(torch.inf, device=low.device)), low)
