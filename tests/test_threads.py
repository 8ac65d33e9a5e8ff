"""Thread counts pinned while a computation runs: torch's and the BLAS libraries' (numpy's, scipy's)."""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_info

from fedleak.threads import blas_threads, pinned_threads


def blas_counts() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_pinned_threads_set_torch_and_blas_and_restore_them():
    np.ones(2) @ np.ones(2)  # numpy's BLAS is loaded
    torch_before, blas_before = torch.get_num_threads(), blas_counts()
    assert blas_before
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
        assert set(blas_counts()) == {1}
    assert torch.get_num_threads() == torch_before
    assert blas_counts() == blas_before


def test_none_leaves_every_count_alone():
    torch_before, blas_before = torch.get_num_threads(), blas_counts()
    with pinned_threads(None), blas_threads(None):
        assert torch.get_num_threads() == torch_before
        assert blas_counts() == blas_before


def test_scipys_blas_is_pinned_once_imported():
    import scipy.linalg  # noqa: F401  (brings scipy's own OpenBLAS)

    with blas_threads(1):
        assert set(blas_counts()) == {1}
