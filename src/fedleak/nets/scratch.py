"""Reused work arrays for the conv blocks' band linear algebra.

Solving a batch's conv blocks makes, per block and sample, a band of ``N`` (13 MB for a 6-channel 28x28 input), its
float32 copy and a few arrays of the same size. Allocated afresh for every sample, they can come back from the
operating system as new pages (the allocator hands large freed blocks back), and touching those costs up to a third
of the band Cholesky itself. Inside :func:`reused_arrays`, :func:`work_array` hands out one array per role instead,
kept until the block leaves.

An array handed out holds whatever its last user wrote: a caller either overwrites it whole or relies on writing
the same entries every time (the band's structural zeros stay zero). It stays valid until the next call with the
same role, so each role has a single user at a time. Outside :func:`reused_arrays` every call gets a new array.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

_POOL: ContextVar[dict | None] = ContextVar("fedleak_reused_arrays", default=None)


@contextmanager
def reused_arrays() -> Iterator[None]:
    """Within the block, :func:`work_array` reuses one array per role, shape, dtype and memory order (nested
    blocks share the outermost one's arrays)."""
    if _POOL.get() is not None:
        yield
        return
    token = _POOL.set({})
    try:
        yield
    finally:
        _POOL.reset(token)


def work_array(role: Hashable, shape: tuple[int, ...], dtype=np.float64, order: str = "C") -> np.ndarray:
    """An array of ``shape``, zeros when first made; inside :func:`reused_arrays` the same one for every call with
    the same ``role``, shape, dtype and order (see the module's notes on what it then holds)."""
    pool = _POOL.get()
    if pool is None:
        return np.zeros(shape, dtype=dtype, order=order)
    key = (role, tuple(shape), np.dtype(dtype), order)
    arr = pool.get(key)
    if arr is None:
        arr = pool[key] = np.zeros(shape, dtype=dtype, order=order)
    return arr
