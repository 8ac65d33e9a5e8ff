"""The joint rank test's Gaussian sketches: drawn a piece at a time, the numbers of one whole draw."""

import pytest
import torch

from fedleak.attacks.exact.rank_test import draw_sketches


@pytest.mark.parametrize("rows, k", [((4096, 785), 300), ((100, 3000), 7), ((17,), 5)])
def test_sketches_drawn_in_pieces_are_one_whole_draw_rounded(rows, k):
    gen = torch.Generator().manual_seed(11)
    whole = [torch.randn(n, k, generator=gen, dtype=torch.float64) for n in rows]
    for dtype in (torch.float32, torch.float64):
        got = draw_sketches(11, rows, k, dtype)
        assert all(g.dtype == dtype and torch.equal(g, w.to(dtype)) for g, w in zip(got, whole))
