"""The map a model's forward puts on its input before its first layer, as the exact methods read it.

A normalisation inside ``forward`` (``(x - mean) / std``, ``x / 255``, ``x * 2 - 1``; with numbers, buffers or any
tensor that does not depend on the input) maps each input value ``x`` to ``z = a x + b`` (``a``, ``b`` per value)
before the first layer reads it; a change of layout there (``x.permute(0, 2, 1)`` of time series stored N x T x C for
a ``Conv1d`` that reads N x C x T, ``x.transpose(1, 2)``, ``x.movedim``) reorders the values, ``z = a x[order] + b``,
and the first layer reads another shape (:attr:`InputMap.first_shape`). :func:`fedleak.nets.input_peel.peel_input_map`
reads the map and gives the model without it; :meth:`InputMap.to_first_layer` takes a client's inputs to what its
first layer reads (the client's own arithmetic, run again), and :meth:`InputMap.restore` maps what the exact attack
rebuilt back to the model's inputs (``x = (z - b) / a``, in the inputs' order and shape), bounding what the client's
rounding of the arithmetic adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedleak.reconstruction import Reconstruction

F64 = torch.float64
# of the exactness tolerance: the most the client's rounding of the arithmetic may take from it (the first layer's
# input is held to the rest). A normalisation's rounding is ~1e-7 of an input value: 5% of 1e-4 of a sample's own
# range covers it down to ranges of ~0.07 of the values' size
ROUNDING_SHARE = 0.05


@dataclass(frozen=True, eq=False)
class InputMap:
    """``z = scale * x + shift`` per input value (flat, float64; ``x[order]`` where the forward changes the layout),
    what the model's forward computes before its first layer; ``written``: the nodes that compute it, as traced;
    ``offsets``: per value, the sum over those nodes of ``|intermediate offset|`` (each node's value is
    ``A_t (x + c_t)``), which bounds the client's rounding of the arithmetic in input units (:meth:`rounding`);
    ``eps``: the machine epsilon of the model's dtype. ``apply``: the arithmetic itself, run on a batch of inputs."""

    scale: torch.Tensor
    shift: torch.Tensor
    offsets: torch.Tensor
    eps: float
    written: tuple[str, ...]
    apply: Callable[[torch.Tensor], torch.Tensor]
    order: torch.Tensor | None = None  # z_j reads x_order[j] (a change of layout, flat indices); None: x_j
    shape: tuple[int, ...] | None = None  # with a change of layout, one input's shape ...
    first_shape: tuple[int, ...] | None = None  # ... and what the first layer reads (else both are the input's)
    rounded: int | None = None  # the written nodes that round a value (None: all; a reordering does not)

    @property
    def uniform(self) -> bool:
        """Whether one ``a`` and one ``b`` serve every value (``(x - 0.5) / 0.25``, not per channel)."""
        return bool((self.scale == self.scale[0]).all() and (self.shift == self.shift[0]).all())

    def describe(self) -> str:
        """The map in words, e.g. ``z = 2.5 x - 1.25`` or ``z = a x + b per value (a in [...], b in [...])``."""
        a, b = self.scale, self.shift
        x = "x" if self.order is None else f"x reordered from {self.shape} to {self.first_shape}"
        if bool((a == 1).all() and (b == 0).all()):
            return f"z = {x}"
        if self.uniform:
            return f"z = {float(a[0]):.6g} {x} {'-' if float(b[0]) < 0 else '+'} {abs(float(b[0])):.6g}"
        return (f"z = a {x} + b per value (a in [{float(a.min()):.4g}, {float(a.max()):.4g}], b in "
                f"[{float(b.min()):.4g}, {float(b.max()):.4g}])")

    def to_first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """What the model's first layer reads for inputs ``x`` (a batch): the forward's own arithmetic, in ``x``'s
        dtype, in the input's shape."""
        z = self.apply(x.clone())  # a copy: an in-place x.sub_(mean) keeps the caller's
        return z if self.order is not None else z.reshape(x.shape)

    def to_inputs(self, z: torch.Tensor) -> torch.Tensor:
        """The model's inputs whose first-layer input is ``z`` (a batch), in float64 then ``z``'s dtype."""
        flat = z.detach().to(F64).reshape(z.shape[0], -1)
        a, b = self.scale.to(flat.device), self.shift.to(flat.device)
        x = (flat - b) / a
        if self.order is None:
            return x.reshape(z.shape).to(z.dtype)
        return x[:, torch.argsort(self.order).to(flat.device)].reshape(z.shape[0], *self.shape).to(z.dtype)

    def rounding(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample of ``x`` (model inputs, a batch), the most the client's rounding of the arithmetic moves an
        input value, in input units: one epsilon of each node's value, taken back to the input
        (``eps * (|x| + |c_t|)`` per node), and float64's own inversion."""
        flat = x.detach().to(F64).reshape(x.shape[0], -1).abs()
        flat = flat if self.order is None else flat[:, self.order.to(flat.device)]  # in the first layer's order
        steps = len(self.written) if self.rounded is None else self.rounded
        per_value = self.eps * (steps * flat + self.offsets.to(flat.device)) + 4e-16 * flat
        return per_value.amax(dim=1)

    def tolerance_in_first_layer(self, exact_tol: float, data_range: tuple[float, float] | None
                                 ) -> tuple[float, tuple[float, float] | None]:
        """The exactness tolerance and data range (None: each input's own) for the first layer's inputs that keep
        every input value's error within ``exact_tol`` of ``data_range`` (or of its own range) once the client's
        rounding of the arithmetic (up to :data:`ROUNDING_SHARE` of it, :meth:`restore`) is added: a data range is
        taken through the map (the hull of every value's image)."""
        tol = exact_tol * (1 - ROUNDING_SHARE)
        if data_range is None:
            return tol, None
        lo, hi = data_range
        ends = torch.stack([self.scale * lo + self.shift, self.scale * hi + self.shift])
        z_lo, z_hi = float(ends.min()), float(ends.max())
        return tol * (hi - lo) * float(self.scale.abs().min()) / max(z_hi - z_lo, 1e-300), (z_lo, z_hi)

    def restore(self, rec: Reconstruction, exact_tol: float, data_range: tuple[float, float] | None = None
                ) -> Reconstruction:
        """``rec`` (rebuilt first-layer inputs, held to :meth:`tolerance_in_first_layer`) in the model's inputs: each
        input mapped back, a stated error bound taken back to input units (over the smallest ``|a|``) plus the
        arithmetic's rounding, and a certificate kept where that rounding is within :data:`ROUNDING_SHARE` of
        ``exact_tol`` of ``data_range`` (None: of the sample's own range), else withdrawn, saying so; a note says
        what was read."""
        if len(rec) == 0:
            return replace(rec, notes=(*rec.notes, self.note()))
        x = self.to_inputs(rec.inputs)
        bound = self.rounding(x).cpu().numpy()
        flat = x.detach().to(F64).reshape(len(x), -1)
        spread = ((flat.amax(dim=1) - flat.amin(dim=1)).cpu().numpy() if data_range is None else
                  np.full(len(x), data_range[1] - data_range[0]))
        smallest = float(self.scale.abs().min())
        samples, certified = [], rec.certified.clone()
        for i, s in enumerate(rec.samples):
            eb = s.error_bound / smallest + bound[i] if np.isfinite(s.error_bound) else s.error_bound
            s = replace(s, error_bound=eb)
            if s.certified and not bound[i] <= ROUNDING_SHARE * exact_tol * spread[i]:
                why = (f"the model's arithmetic on its input ({self.describe()}) rounds it by up to {bound[i]:.2e} in "
                       f"the client's dtype, more than {ROUNDING_SHARE:g} of the exactness tolerance of "
                       f"{'the data range' if data_range is not None else 'its own range'} ({spread[i]:.3g}) allows: "
                       "the first layer's input is certified, this input is not"
                       + ("" if data_range is not None else "; data_range= (the data's) holds it to that range"))
                s = replace(s, certified=False, reason=why)
                certified[i] = False
            samples.append(s)
        whole = rec.batch_certified and bool(certified.all())
        return replace(rec, inputs=x, certified=certified, samples=tuple(samples), batch_certified=whole,
                       notes=(*rec.notes, self.note()))

    def note(self) -> str:
        """The map in a note: what fedleak's exact methods read, and how their inputs relate to the model's."""
        return (f"the model's forward maps its input before its first layer ({', '.join(self.written)}: "
                f"{self.describe()}); the exact methods read what the first layer reads, and what they rebuild is "
                "mapped back through the inverse")



def first_layer_shape(input_map: InputMap | None, input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """The input shape the model without ``input_map`` reads, for inputs of ``input_shape``: the first layer's where
    the map changes the layout, else ``input_shape`` itself."""
    if input_map is None or input_map.first_shape is None:
        return None if input_shape is None else tuple(input_shape)
    return input_map.first_shape
