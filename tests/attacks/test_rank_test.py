"""The joint rank test's Gaussian sketches: a sketch of ``k`` columns is the first ``k`` columns of any wider one of
the same seed, whatever was drawn and kept before, and the columns kept stay within their budget."""

import pytest
import torch

from fedleak.attacks.exact import rank_test
from fedleak.attacks.exact.rank_test import SketchColumns, gaussian_sketches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_narrower_sketch_is_the_first_columns_of_a_wider_one_in_any_order(dtype, monkeypatch):
    rows = (4096, 785)
    monkeypatch.setattr(rank_test, "SKETCH_COLUMNS", SketchColumns(2**40))
    narrow_first = [gaussian_sketches(11, rows, k, dtype) for k in (7, 40, 300)]
    monkeypatch.setattr(rank_test, "SKETCH_COLUMNS", SketchColumns(0))  # nothing kept: every call draws afresh
    wide_first = [gaussian_sketches(11, rows, k, dtype) for k in (300, 40, 7)][::-1]
    for a, b in zip(narrow_first, wide_first):
        assert all(x.dtype == dtype and torch.equal(x, y) for x, y in zip(a, b))
    for k, sketch in zip((7, 40), narrow_first):
        assert all(torch.equal(s, w[:, :k]) for s, w in zip(sketch, narrow_first[2]))
    # a Gaussian draw: the layers' matrices differ, and their entries have unit variance
    first, second = narrow_first[2]
    assert not torch.equal(first[:785], second)
    assert abs(float(first.to(torch.float64).var()) - 1.0) < 0.01


def test_a_float64_sketch_holds_the_float32_sketchs_numbers():
    """A float32 gradient's sketch and a float64 one's are the same matrix: their verdicts differ by rounding only."""
    f32, f64 = (gaussian_sketches(5, (300, 40), 24, dtype) for dtype in (torch.float32, torch.float64))
    assert all(torch.equal(a.to(torch.float64), b) for a, b in zip(f32, f64))


def test_the_columns_kept_stay_within_their_budget():
    cols = SketchColumns(budget=3 * 16 * 1000 * 4)
    for seed in range(5):
        cols.take(seed, 0, 1000, 20, torch.float32)  # two blocks of 16 columns each
    assert sum(t.nbytes for t in cols.drawn.values()) <= cols.budget
    assert list(cols.drawn) == [(4, 0, 1000, torch.float32)]  # the most recent one kept, the older dropped
    assert torch.equal(cols.take(4, 0, 1000, 10, torch.float32), cols.drawn[(4, 0, 1000, torch.float32)][:10])
