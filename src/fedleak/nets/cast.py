"""One copy of a model's tensor in another dtype (or on another device), shared by everyone who asks for it
while anyone still holds it, and :func:`state`, which tells when a tensor's values may have changed.

The exact attack reads a large head in float64 in several places (its own state, the certificate's forward
passes, the whole-batch gradient); converting the weights each time cost a copy of the whole model per place.
:func:`cast` hands out one copy per tensor, dtype and device. The cache holds it *weakly*: it lives as long as a
caller keeps it (a :class:`~fedleak.nets.Network` keeps what its head converted), so nothing outlives the attack
that made it. A tensor changed in any way (in place, through ``.data``, or replaced) gets a new copy. Callers must
not modify what they get.

Telling a change through ``.data`` takes a pass over the tensor (its bits' sum) on every call. A caller that reads
one model many times and does not change it meanwhile (an attack, a fishing call) runs inside :func:`unchanged`:
there each tensor's sum is taken once, and its storage and version are trusted after that.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def state(tensor: torch.Tensor) -> tuple:
    """A fingerprint of ``tensor``'s values: its storage, version and the integer sum of its bits (one pass; an
    update through ``.data`` does not bump the version, but changes the sum)."""
    t = tensor.detach()
    flat = t.contiguous().reshape(-1)
    return t.data_ptr(), version(t), t.dtype, str(t.device), tuple(t.shape), bit_sum(flat)


def version(tensor: torch.Tensor) -> int:
    """The tensor's version counter; -1 for an inference tensor (a tensor made in ``torch.inference_mode``, a
    model built there for one), which has none: its bits' sum still tells a change."""
    return -1 if tensor.is_inference() else tensor._version


def bit_sum(flat: torch.Tensor) -> int | float:
    """The sum of a flat tensor's bits read as integers: as 64-bit words where the bytes allow (torch sums int64
    some 20 times faster than int32), else per element."""
    size = flat.element_size()
    if size < 8 and flat.numel() * size % 8 == 0:
        try:
            return int(flat.view(torch.int64).sum())
        except RuntimeError:  # a view whose offset is not 8-byte aligned
            pass
    bits = _BITS.get(size)
    return int(flat.view(bits).sum()) if bits is not None else float(flat.double().sum())


# inside unchanged(): id(tensor) -> (weak reference, storage and version, state)
_TRUSTED: dict[int, tuple[weakref.ref, tuple, tuple]] | None = None


@contextmanager
def unchanged() -> Iterator[None]:
    """A block in which the caller does not change the tensors it casts (not even through ``.data``): each
    tensor's :func:`state` is computed once in it (nested blocks share the outermost one's)."""
    global _TRUSTED
    outer = _TRUSTED is None
    if outer:
        _TRUSTED = {}
    try:
        yield
    finally:
        if outer:
            _TRUSTED = None


def fingerprint(tensor: torch.Tensor) -> tuple:
    """:func:`state`, computed once per tensor inside :func:`unchanged`."""
    trusted = _TRUSTED
    if trusted is None:
        return state(tensor)
    t = tensor.detach()
    quick = (t.data_ptr(), version(t))
    known = trusted.get(id(tensor))
    if known is not None and known[0]() is tensor and known[1] == quick:
        return known[2]
    now = state(tensor)
    trusted[id(tensor)] = (weakref.ref(tensor), quick, now)
    return now


# id(tensor) -> (weak reference to the tensor, {(dtype, device): (state, weak reference to the copy)}); keyed by id
# because a tensor's == is elementwise (a weak-key dictionary would compare tensors)
_COPIES: dict[int, tuple[weakref.ref, dict]] = {}


def cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``tensor.detach().to(device, dtype)``, shared with every other caller while it is alive."""
    device = tensor.device if device is None else torch.device(device)
    if tensor.dtype == dtype and tensor.device == device:
        return tensor.detach()
    entry = _COPIES.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        if len(_COPIES) > 256:  # forget tensors that are gone
            for k in [k for k, (ref, _) in _COPIES.items() if ref() is None]:
                del _COPIES[k]
        entry = _COPIES[id(tensor)] = (weakref.ref(tensor), {})
    now = fingerprint(tensor)
    known = entry[1].get((dtype, device))
    copy = known[1]() if known is not None and known[0] == now else None
    if copy is None:
        copy = tensor.detach().to(device=device, dtype=dtype)
        entry[1][dtype, device] = (now, weakref.ref(copy))
    return copy
