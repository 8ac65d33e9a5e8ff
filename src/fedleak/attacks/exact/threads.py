"""Torch's thread count, pinned while the exact attack runs and restored after.

The attack's work is many small and medium float64 products: on a machine whose other cores are busy, torch's
default of one thread per core made it 2-14x slower (2-core CPU, one other job). The option ``threads`` of
:class:`~fedleak.attacks.exact.options.ExclusivityOptions` sets the count (1 by default; None keeps torch's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
