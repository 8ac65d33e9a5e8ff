"""The span of a set of rows: its basis from a Gaussian sketch (whole or a piece at a time), the rows'
coordinates with bounds on what they leave off, and the pairs of rows shortlisted from those coordinates."""

from __future__ import annotations

import pytest
import torch

from fedleak.attacks.exact import candidates, grouping
from fedleak.attacks.exact.candidates import Candidate, unique_candidates
from fedleak.attacks.exact.grouping import ImpliedInputs, cluster_bucket
from fedleak.attacks.exact.row_span import BLOCK, in_pieces, near_in_span, span_basis, span_coordinates, whole

F64 = torch.float64


def span_rows(n: int, rank: int, dim: int, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, rank, generator=gen, dtype=F64) @ torch.rand(rank, dim, generator=gen, dtype=F64)
    return X + noise * X.abs().amax() * torch.randn(X.shape, generator=gen, dtype=F64)


def test_span_basis_finds_the_rank_under_rounding_noise():
    X = span_rows(40, 5, 300, 1e-8)
    Q = span_basis(whole(X), len(X), max_rank=20)
    assert Q.shape == (300, 5)
    assert torch.allclose(Q.T @ Q, torch.eye(5, dtype=F64), atol=1e-12)
    assert float((X - X @ Q @ Q.T).norm() / X.norm()) < 1e-7
    wide = span_rows(80, 40, 300, 0.0, seed=1)
    Q = span_basis(whole(wide), 80, max_rank=64)  # rank 40: the sketch of 32 rows is widened to 64
    assert Q.shape == (300, 40) and float((wide - wide @ Q @ Q.T).norm() / wide.norm()) < 1e-10
    assert span_basis(whole(wide), 80, max_rank=20) is None  # wider than asked for
    assert span_basis(whole(torch.zeros(6, 10, dtype=F64)), 6, max_rank=3) is None
    assert span_basis(whole(torch.full((6, 10), 1e200, dtype=F64)), 6, max_rank=3) is None  # its Gram overflows


def test_a_basis_read_in_pieces_spans_the_rows():
    X = span_rows(500, 7, 120, 1e-9, seed=2)
    for pieces in (whole(X), in_pieces(X, 64), in_pieces(X, 13)):
        Q = span_basis(pieces, len(X), max_rank=40)
        assert Q.shape == (120, 7)
        assert float((X - X @ Q @ Q.T).norm() / X.norm()) < 1e-8


def test_coordinates_bound_every_pairs_distance_from_below():
    """``||x_a - x_b|| >= shrink ||c_a - c_b|| - rho_a - rho_b`` for every pair, with rows on the span and rows
    well off it (a large remainder), and ``rho`` bounds each row's remainder."""
    X = span_rows(300, 6, 200, 1e-7, seed=3)
    gen = torch.Generator().manual_seed(4)
    X[::37] += 1e-3 * torch.randn(len(X[::37]), 200, generator=gen, dtype=F64)  # off the span
    coords = span_coordinates(in_pieces(X, 64), len(X), X.shape[1], max_rank=40)
    assert coords is not None and coords.C.shape[1] < 40 and 0.999 < coords.shrink <= 1.0
    assert bool(((X - coords.C @ coords.Q.T).norm(dim=1) <= coords.rho).all())
    assert float(coords.rho[1]) < 1e-5 * float(X[1].norm())  # on the span: a remainder of the noise's size
    low = coords.shrink * torch.cdist(coords.C, coords.C) - coords.rho[:, None] - coords.rho[None, :]
    assert bool((low <= torch.cdist(X, X) * (1 + 1e-12)).all())


@pytest.mark.parametrize("n", [40, 3 * BLOCK + 5])
def test_the_span_shortlist_holds_every_pair_within_tolerance(n):
    """Pairs planted at 0.5, 0.999, 1.001 and 3 times the tolerance: the shortlist holds every pair an exact
    float64 distance puts within it (relative to the larger norm), and, the rows' remainders being small, none
    much farther."""
    tol = 1e-4
    X = span_rows(n, 5, 64, 0.0, seed=5)
    gen = torch.Generator().manual_seed(6)
    factors = torch.tensor([0.5, 0.999, 1.001, 3.0], dtype=F64)
    pairs = []
    for j, f in enumerate(factors.tolist()):  # row 2j+1 moved off row 2j along a direction in the span
        a, b = 2 * j, 2 * j + 1
        step = X[b + 4] - X[a]
        step = step / step.norm()
        X[b] = X[a] + f * tol * X[a].norm() * step
        X[b] *= 1 + 1e-12 * torch.randn((), generator=gen, dtype=F64)
        pairs.append((a, b, f))
    norms = X.norm(dim=1)
    coords = span_coordinates(whole(X), n, X.shape[1], max_rank=min(n, 64) // 4)
    near = near_in_span(coords, norms, tol)
    truth = torch.cdist(X, X) <= tol * torch.maximum(norms[:, None], norms[None, :])
    assert bool((near | ~truth).all())  # a superset of the pairs within tol
    assert torch.equal(near, near.T)
    for a, b, f in pairs:
        assert bool(truth[a, b]) == (f < 1), (a, b, f)
        assert bool(near[a, b]) or f > 1, (a, b, f)
    assert not bool(near[6, 7])  # three times the tolerance
    # tight: on rows this close to their span, no pair shortlisted lies farther than 1.01 tol
    assert bool((torch.cdist(X, X)[near] <= 1.01 * tol * torch.maximum(norms[:, None], norms[None, :])[near]).all())
    # a subset of rows (one label's candidates) reads the same pairs as the whole set does
    sel = torch.arange(0, n, 3)
    assert torch.equal(near_in_span(coords, norms[sel], tol, sel), near[sel][:, sel])


def test_a_bucket_clustered_from_its_span_matches_the_gram_shortlist(monkeypatch):
    """Rows of 40 entries on a 5-dimensional span, in 300 groups of 4 rows each: clustered from the span's
    coordinates (the Gram matrix of the rows is never formed), the groups and spreads are those of the Gram
    shortlist."""
    tol = 1e-5
    centres = span_rows(300, 5, 40, 0.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    R = centres.repeat_interleave(4, 0)
    R = R + 2e-7 * R.norm(dim=1, keepdim=True) * torch.randn(R.shape, generator=gen, dtype=F64) / 40**0.5
    rows = ImpliedInputs.of(R)
    run = torch.randperm(len(R), generator=gen)
    norms = R.norm(dim=1)
    monkeypatch.setattr(grouping, "SPAN_ROWS", 10**9)
    expected = cluster_bucket(rows, run, norms, tol)
    monkeypatch.setattr(grouping, "SPAN_ROWS", 0)
    monkeypatch.setattr(grouping, "near_pairs", lambda *a: pytest.fail("the Gram shortlist was formed"))
    got = cluster_bucket(rows, run, norms, tol)
    assert [g.rows for g in got] == [g.rows for g in expected]
    assert [g.spread for g in got] == [g.spread for g in expected]
    assert sorted(map(len, (g.rows for g in got))) == [4] * 300


def test_many_candidates_are_deduplicated_from_their_span_as_from_their_gram_matrix(monkeypatch):
    """200 candidates of two labels, each input twice (the second copy within the tolerance): one copy of each
    is kept, the one with more witnesses, with the span's shortlist as with the Gram matrix's."""
    X = span_rows(100, 6, 50, 0.0, seed=9)
    gen = torch.Generator().manual_seed(10)
    twins = X * (1 + 1e-6 * torch.randn(100, 1, generator=gen, dtype=F64))
    cands = [Candidate(label=k % 2, acts={0: x}, witnesses={0: list(range(1 + (k < 100)))}, lowest=0)
             for k, x in enumerate(torch.cat([X, twins]))]
    assert len(cands) > candidates.PER_LABEL_GRAM
    kept = unique_candidates(cands, 0, 1e-5)
    monkeypatch.setattr(candidates, "span_coordinates", lambda *a, **k: None)  # the Gram matrix per label
    assert [id(c) for c in unique_candidates(cands, 0, 1e-5)] == [id(c) for c in kept]
    assert len(kept) == 100 and all(len(c.witnesses[0]) == 2 for c in kept)
