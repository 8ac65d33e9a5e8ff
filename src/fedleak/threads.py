"""Thread counts, pinned while a computation runs and restored after: torch's, and the BLAS libraries' that
numpy and scipy load (through threadpoolctl).

The exact attack's work is many small and medium float64 products: on a machine whose other cores are busy,
torch's default of one thread per core made it 2-14x slower (2-core CPU, one other job); band factorisations of
the conv inversion are too small to gain from a threaded BLAS (2x slower on 2 threads).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from threadpoolctl import ThreadpoolController


@functools.cache
def _controller(with_scipy: bool) -> ThreadpoolController:
    """The BLAS libraries loaded now (scanning them costs ~1 ms, so it is done once); scipy brings its own
    OpenBLAS when ``scipy.linalg`` is imported, which a scan made before misses: hence one per state."""
    return ThreadpoolController()


def blas_threads(n: int | None):
    """A context in which the BLAS libraries of numpy (and of scipy, once imported) use ``n`` threads (None:
    unchanged)."""
    if n is None:
        return nullcontext()
    return _controller("scipy.linalg" in sys.modules).limit(limits=n, user_api="blas")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (nothing changes for None), restoring the count after."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def pinned_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch and the BLAS libraries on ``n`` threads each (None: unchanged)."""
    with torch_threads(n), blas_threads(n):
        yield
