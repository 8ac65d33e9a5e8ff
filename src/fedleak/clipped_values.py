"""Gradients clipped by value: what ``torch.nn.utils.clip_grad_value_`` leaves in an update, read off its values.

A client that calls ``clip_grad_value_(model.parameters(), c)`` before it sends its gradient cuts every entry to
``[-c, c]``: each entry beyond the bound becomes exactly ``±c``. In a gradient that was not clipped, the largest
magnitude belongs to one unit (a row of a weight matrix with its bias entry: ``dL/dW_i = dL/dz_i x``, and a sample's
pixels at the data's top value repeat ``dL/db_i`` along the row); two units whose largest entries agree to the last
bit do not occur by chance, except the two rows of a two-class output layer, which are each other's negatives
(``p - onehot(y)`` sums to 0), and count as one. So an update whose largest magnitude is held by entries of two or
more units was clipped at that magnitude (:func:`read_value_clip`).

An entry at the bound is *censored*: the client's true value is at least ``c`` in magnitude, of the same sign. Every
other entry is as the client computed it. The attacks use this: a row without censored entries is a sample's input
times its bias gradient as before, and a recomputed gradient is compared with the update after the same clipping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedleak.precision import sample_entries

MIN_UNITS = 2  # units whose largest entries sit at the same magnitude: a clipped update
#: a quantised or sign-compressed update's values are whole multiples of one step, its top one no clip; a clipped
#: gradient's largest tensor is not on such a grid (its values, sampled, divided by the smallest, are no integers)
GRID_SAMPLE = 1 << 14
GRID_TOL = 1e-2


@dataclass(frozen=True)
class ValueClip:
    """An update clipped by value: ``bound`` (the ``c`` of ``clip_grad_value_``), how many ``entries`` sit at ``±c``,
    of how many ``units`` (a layer's output unit: its weight row and bias entry), in which ``tensors``."""

    bound: float
    entries: int
    units: int
    tensors: tuple[str, ...]

    def censored(self, t: torch.Tensor) -> torch.Tensor:
        """Where ``t``'s entries sit at the bound (their true values are at least that large)."""
        return t.detach().abs() >= self.bound

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` clipped as the client clipped its update."""
        return t.clamp(-self.bound, self.bound)

    def describe(self) -> str:
        names = ", ".join(f"'{n}'" for n in self.tensors[:3]) + (" ..." if len(self.tensors) > 3 else "")
        if self.units < MIN_UNITS:  # a hypothesis an attack confirmed, not what the values show by themselves
            return (f"the update's largest magnitude, {self.bound:.4g} ({self.entries} entries of one unit, in "
                    f"{names}), read as the bound of a clipping by value (torch.nn.utils.clip_grad_value_)")
        return (f"the update was clipped by value at ±{self.bound:.4g} (torch.nn.utils.clip_grad_value_): "
                f"{self.entries} entries of {self.units} units ({names}) sit exactly at that magnitude")


def read_value_clip(tensors: Mapping[str, torch.Tensor], min_units: int = MIN_UNITS) -> ValueClip | None:
    """The value clipping ``tensors`` (name -> gradient) show, or None: the largest magnitude over every floating
    tensor, held by entries of at least ``min_units`` units (a unit: a parameter's layer, the name before its
    last ``.``, and the index along its first dimension). ``min_units=1`` reads any update as clipped at its largest
    magnitude: a hypothesis (a clip that cut one unit only does not show), for an attack to test."""
    floats = {n: t.detach() for n, t in tensors.items() if t.is_floating_point() and t.numel()}
    if not floats:
        return None
    peaks = {n: max(-float(lo), float(hi)) for n, (lo, hi) in ((n, torch.aminmax(t)) for n, t in floats.items())}
    top = max(peaks.values())  # one pass over the update, no copy: it runs after attacks that certified little
    if not top > 0 or top == float("inf"):
        return None
    units: set[tuple[str, int]] = set()
    entries, names = 0, []
    for name, t in floats.items():
        if peaks[name] != top:
            continue
        at = t.abs() == top
        count = int(at.sum())
        if not count:
            continue
        entries += count
        names.append(name)
        rows = at.reshape(t.shape[0], -1).any(1) if t.ndim else at.reshape(1)
        if t.ndim and t.shape[0] == 2:  # a two-class output layer: its rows are each other's negatives
            rows[1] = bool((at[1] & (t[1] != -t[0])).any())
        layer = name.rpartition(".")[0]
        units.update((layer, int(i)) for i in torch.nonzero(rows).flatten().tolist())
    if len(units) < min_units:
        return None
    if on_grid(max(floats.values(), key=lambda t: t.numel())):
        return None
    return ValueClip(top, entries, len(units), tuple(names))


def on_grid(t: torch.Tensor) -> bool:
    """Whether ``t``'s nonzero values (a strided sample) are whole multiples of the smallest one: a quantised or
    sign-compressed tensor's are."""
    v = sample_entries(t, GRID_SAMPLE).abs().double()
    v = v[v > 0]
    if not v.numel():
        return True
    k = v / v.min()
    return bool(((k - k.round()).abs() <= GRID_TOL).all())
