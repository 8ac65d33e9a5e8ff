"""The head attack reads the observed gradient in float64 a piece at a time, without a float64 copy of a layer."""

from __future__ import annotations

import torch

from fedleak.attacks.exact.float64 import PIECE_ENTRIES, PIECE_ROWS, row_norms64, rows64, times64


def test_pieces_read_the_same_values_as_a_float64_copy():
    gen = torch.Generator().manual_seed(0)
    cols = 300
    G = torch.randn(2 * max(PIECE_ENTRIES // cols, PIECE_ROWS) + 7, cols, generator=gen)  # three pieces, the last short
    G64 = G.double()
    B = torch.randn(cols, 9, generator=gen, dtype=torch.float64)
    assert torch.allclose(times64(G, B), G64 @ B, rtol=1e-12, atol=1e-12)
    L = torch.randn(3, G.shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(times64(G.T, L.T).T, L @ G64, rtol=1e-12, atol=1e-12)  # a product from the left
    assert torch.equal(times64(G64, B), G64 @ B)  # a float64 layer is multiplied as it is
    rows = torch.tensor([5, 0, G.shape[0] - 1])
    assert torch.equal(rows64(G, rows), G64[rows])
    assert torch.allclose(row_norms64(G), G64.norm(dim=1), rtol=1e-14, atol=0)
    assert torch.allclose(row_norms64(G, dim=0), G64.norm(dim=0), rtol=1e-14, atol=0)
    assert row_norms64(G).dtype == torch.float64
