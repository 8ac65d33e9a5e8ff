"""A client's weight change (``new - old``, or ``old - new``), told from a gradient and read as a weight update.

Frameworks that send deltas instead of weights (and people who subtract the round's weights themselves) give a
server ``new - old`` (minus the learning rate times the gradient, after one SGD step) or ``old - new`` (FedOpt's
pseudo-gradient). Read as a gradient, such a change carries the rounding of the weights it is the difference of,
far more than a gradient's own, and its sign may be negative; read as a :class:`~fedleak.updates.WeightUpdate` from
the model's weights (the round's), it is modelled as it is.

What tells it (:class:`GridEvidence`): both weights are floats of the model's dtype, so the difference of a weight
moved by less than 1/64 of itself is a whole multiple of the spacing of floats (one unit in the last place) near
it, exactly (Sterbenz), with random low bits: about half of them are multiples of twice it. A gradient's entry that
small beside its weight has six or more bits of its own below that spacing and lies on it about once in 64 or less;
one carried in a coarser format (float16, bfloat16, quantised) may lie on it, but then on twice it too.

Its sign: with four classes or more the output layer's columns read it (:func:`fedleak.attacks.labels.
column_signs`, measured on 216 gradients); with two or three classes it is not read (:data:`UNSIGNED`), and
the certified attacks try both (:func:`either_sign`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.attacks.labels import column_signs
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate

SMALL = 2.0 ** -6  # entries moved by less than this fraction of their weight are read
SCREEN = 4096  # entries read per tensor (spread over it); 64 times as many where that finds too few
MIN_ENTRIES = 64  # fewer small entries tell nothing
GLANCE = 512  # entries of the largest tensor read first: a gradient shows in a few of them
ON_GRID = 0.99  # this share of them on the spacing: a change (a gradient: about 1/64 or less)
ON_TWICE = 0.75  # ... and at most this share on twice it (a change: about half; a coarser format: all)
UNSIGNED = "sign_unread"  # a WeightUpdate's metadata key: its change's sign was not read (True)
#: the note of a change whose sign was not read, certified with the other sign
OTHER_SIGN = "read with the other sign (old - new): nothing was certified as new - old"
NEAR = 1e-3  # a change divided by a learning rate, times it again: within this many spacings of the spacing ...
NEAR_MOST = 2.0 ** 10  # ... read where it is at most this many spacings (the quotient's rounding stays below 2**-14)


@dataclass(frozen=True)
class GridEvidence:
    """How many small entries (``entries``) of a map of tensors lie on the spacing of the model's weights
    (``on_grid``), and on twice it (``on_twice``)."""

    entries: int
    on_grid: int
    on_twice: int

    @property
    def holds_change(self) -> bool:
        return (self.entries >= MIN_ENTRIES and self.on_grid >= ON_GRID * self.entries
                and self.on_twice <= ON_TWICE * self.entries)

    def said(self) -> str:
        return (f"{self.on_grid:,} of {self.entries:,} entries small beside their weights are whole multiples of "
                "the weights' float spacing, as differences of two weights are and a gradient's are not")


def grid_evidence(model: nn.Module, tensors: Mapping[str, object], factor: float | None = None
                  ) -> GridEvidence | None:
    """The :class:`GridEvidence` of ``tensors`` against the model's floating-point parameters they name with their
    shapes (:data:`SCREEN` entries of each, spread over it; 64 times as many where that finds fewer than
    :data:`MIN_ENTRIES` small ones), after a glance at :data:`GLANCE` entries of the largest, which tells most
    gradients (and is what is returned for them); None where they name none. ``factor``: the tensors times it (in
    float64), read near the spacing (:data:`NEAR`) rather than on it: a weight change divided by a learning rate
    and rounded to its dtype, times the rate again."""
    own = dict(model.named_parameters())
    pairs = [(t.detach().reshape(-1), own[name].detach().reshape(-1)) for name, t in tensors.items()
             if name in own and isinstance(t, torch.Tensor) and t.is_floating_point()
             and tuple(t.shape) == tuple(own[name].shape)]
    if not pairs:
        return None
    largest = [max(pairs, key=lambda pair: pair[1].numel())]
    for read, most in ((largest, GLANCE), (pairs, SCREEN), (pairs, 64 * SCREEN)):
        evidence = _counted(read, most, factor)
        # enough entries to tell; or a few, half of them off the spacing, which no change has a single one of
        if evidence.entries >= MIN_ENTRIES or (evidence.entries >= 8 and 2 * evidence.on_grid <= evidence.entries):
            return evidence
    return evidence


def _counted(pairs: list[tuple[torch.Tensor, torch.Tensor]], most: int, factor: float | None) -> GridEvidence:
    """The evidence of up to ``most`` entries of each pair (spread over it), read together (times ``factor``)."""
    dtype = max(pairs, key=lambda pair: pair[1].numel())[1].dtype  # the weights' (the largest tensor's)
    strided = [(t[:: max(1, w.numel() // most)], w[:: max(1, w.numel() // most)]) for t, w in pairs
               if w.dtype == dtype]
    w = torch.cat([w for _, w in strided])
    d = torch.cat([t.to(device=w.device, dtype=dtype if factor is None else torch.float64) for t, _ in strided])
    d = d if factor is None else d * factor
    small = (d != 0) & (d.abs() < SMALL * w.abs())
    d, w = d[small], w[small]
    low = w.abs() - d.abs().to(dtype)  # the smaller of the two weights' magnitudes at most: its spacing is finer
    q = d / (torch.nextafter(low, torch.full_like(low, float("inf"))) - low).to(d.dtype)  # a power of two divides
    if factor is not None:  # rounded once to the change's dtype: near the spacing, where a few spacings
        read = q.abs() <= NEAR_MOST
        q, small = q[read], read
    whole = q == torch.round(q) if factor is None else (q - torch.round(q)).abs() <= NEAR
    even = torch.remainder(torch.round(q), 2) == 0
    return GridEvidence(int(small.sum()), int(whole.sum()), int((whole & even).sum()))


def change_sign(model: nn.Module, change: Mapping[str, torch.Tensor]) -> int | None:
    """+1 where ``change`` reads as ``new - old`` (a gradient's negative), -1 as ``old - new``, None where its sign
    is not read (:func:`~fedleak.attacks.labels.column_signs`: fewer than four classes, or no output layer)."""
    signs = column_signs(model, change)
    return None if signs is None else (1 if signs.negated else -1)


def as_weights_after(before: Mapping[str, torch.Tensor], change: Mapping[str, torch.Tensor],
                     sign: int) -> dict[str, torch.Tensor]:
    """The client's weights after: ``before + sign * change`` of every floating-point entry (``sign`` +1 for
    ``new - old``), the others (counters) as they were."""
    return {k: (before[k] + sign * change[k].to(before[k].dtype)) if before[k].is_floating_point() else before[k]
            for k in before}


def either_sign(run: Callable[[object], Reconstruction], update: object) -> Reconstruction:
    """``run(update)`` (a certified attack on ``update``); where that certifies nothing and ``update`` is a change
    whose sign was not read, ``run`` of the other sign, where that certifies, noted (:data:`OTHER_SIGN`). A wrong
    sign certifies nothing: every certificate recomputes the update, whose labels' signs it fixes."""
    rec = run(update)
    other = other_sign(update) if not rec.num_certified else None
    if other is None:
        return rec
    again = run(other)
    return replace(again, notes=(*again.notes, OTHER_SIGN)) if again.num_certified else rec


def other_sign(update: object) -> WeightUpdate | None:
    """A weight update read from a change whose sign was not read (:data:`UNSIGNED`), with the other sign; None for
    any other update."""
    if not isinstance(update, WeightUpdate) or not update.metadata.get(UNSIGNED):
        return None
    flipped = {k: (2 * b - update.after[k]) if b.is_floating_point() else update.after[k]
               for k, b in update.before.items()}
    return replace(update, after=flipped)
