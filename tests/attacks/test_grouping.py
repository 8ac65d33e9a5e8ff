"""Gradient rows grouped by the input they imply: leader clustering, each group's spread, and the implied inputs
read a piece at a time from the gradient as the client sent it."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.attacks.exact import grouping
from fedleak.attacks.exact.grouping import HELD_BYTES, ROW_CHUNK, ImpliedInputs, group_rows, split_runs


def clustered_rows(n: int = 400, centres: int = 30, dim: int = 12, noise: float = 4e-6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(centres, dim, generator=gen, dtype=torch.float64)
    R = C[torch.randint(0, centres, (n,), generator=gen)]
    R = R * (1 + 1e-6 * torch.randn(n, 1, generator=gen, dtype=torch.float64))
    R = R + noise * torch.randn(n, dim, generator=gen, dtype=torch.float64) * R.norm(dim=1, keepdim=True)
    return R, torch.randperm(n, generator=gen)


@pytest.mark.parametrize("centres,dim,shortlist", [(30, 12, False), (300, 2, False), (300, 2, True)])
def test_row_grouping_matches_leader_clustering_by_brute_force(centres, dim, shortlist, monkeypatch):
    """In two dimensions the random projections cannot tell most centres apart, so buckets hold many groups
    and are split over several rounds of leaders, or (``shortlist``) clustered from a Gram shortlist after
    their first group."""
    if shortlist:
        monkeypatch.setattr(grouping, "MANY", 0)
    R, order = clustered_rows(n=400 if centres == 30 else 1200, centres=centres, dim=dim)
    tol = 1e-5
    norms = R.norm(dim=1)
    expected, assigned = [], torch.zeros(len(R), dtype=torch.bool)
    for lead in order.tolist():  # the definition: the first unassigned row leads, every row near it joins
        if assigned[lead]:
            continue
        near = ((R - R[lead]).norm(dim=1) <= tol * torch.maximum(norms, norms[lead])) & ~assigned
        near[lead] = True
        assigned |= near
        expected.append(sorted(torch.nonzero(near).flatten().tolist()))
    got = [grp.rows for grp in group_rows(R, order, tol)]
    assert sorted(map(sorted, got)) == sorted(expected)
    assert centres <= len(got) < len(R)  # near rows were grouped, far ones were not
    scan = ImpliedInputs.of(R).scan()
    assert len(split_runs(scan.proj, 4 * tol)) < len(got) or centres == 30  # buckets of several groups
    first = [grp[0] for grp in got]  # each group led by its first row in visiting order, groups in that order
    rank = {row: k for k, row in enumerate(order.tolist())}
    assert all([rank[r] for r in grp] == sorted(rank[r] for r in grp) for grp in got)
    assert [rank[r] for r in first] == sorted(rank[r] for r in first)


def test_rows_far_from_a_leader_in_projection_are_not_measured(monkeypatch):
    """Inputs along a line, 2.5 tol apart: their projections chain into one bucket of 200 groups. After its first
    group the bucket is clustered from a Gram shortlist: each leader measures only the rows that may lie within
    tol, not every row left in the bucket; the groups and spreads are the leader clustering's."""
    tol, n_groups = 1e-5, 200
    gen = torch.Generator().manual_seed(1)
    base, step = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    base, step = base / base.norm(), step / step.norm()
    centres = base + 2.5 * tol * torch.arange(n_groups, dtype=torch.float64)[:, None] * step
    R = centres.repeat_interleave(3, 0) * (1 + 1e-7 * torch.randn(3 * n_groups, 1, generator=gen, dtype=torch.float64))
    order = torch.arange(len(R))
    measured = []
    distances = ImpliedInputs.distances

    def counted(self, sel, point, which=None):
        measured.append(len(sel))
        return distances(self, sel, point, which)

    monkeypatch.setattr(ImpliedInputs, "distances", counted)
    groups = group_rows(R, order, tol)
    assert sorted(grp.rows for grp in groups) == [[3 * k, 3 * k + 1, 3 * k + 2] for k in range(n_groups)]
    for grp in groups:  # each spread as defined: the farthest member from the leader over the smallest norm
        rows = torch.tensor(grp.rows)
        far = float((R[rows] - R[rows[0]]).norm(dim=1).max())
        assert grp.spread == pytest.approx(far / float(R[rows].norm(dim=1).min()), rel=1e-9)
    assert len(split_runs(ImpliedInputs.of(R).scan().proj, 4 * tol)) == 1  # one bucket ...
    assert len(measured) == n_groups  # ... of 200 rounds of leaders,
    assert sum(measured) <= 10 * len(R)  # each measuring the rows near its leader, not the ~300 left on average


def chained_runs(proj: torch.Tensor, members: list[int], gap: float, level: int = 0) -> list[list[int]]:
    """The buckets by definition, one run at a time: sort by this level's projection, cut at gaps, recurse."""
    members = sorted(members, key=lambda r: float(proj[level, r]))
    runs, run = [], [members[0]]
    for a, b in zip(members, members[1:]):
        if float(proj[level, b] - proj[level, a]) > gap:
            runs.append(run)
            run = []
        run.append(b)
    runs.append(run)
    if level + 1 == proj.shape[0]:
        return runs
    return [sub for r in runs for sub in ([r] if len(r) == 1 else chained_runs(proj, r, gap, level + 1))]


@pytest.mark.parametrize("gap", [1e-4, 0.05, 0.5])
def test_runs_split_level_by_level_match_the_recursive_definition(gap):
    """Every run of a level is split at once; the buckets are those of splitting each run in turn, and rows within
    the gap at every level share a bucket."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 15, generator=gen, dtype=torch.float64)
    which = torch.randint(0, 15, (300,), generator=gen)
    proj = centres[:, which] + 0.02 * torch.randn(4, 300, generator=gen, dtype=torch.float64)
    got = sorted(sorted(run.tolist()) for run in split_runs(proj, gap))
    assert got == sorted(sorted(run) for run in chained_runs(proj, list(range(300)), gap))
    assert sorted(r for run in got for r in run) == list(range(300))
    bucket = {r: k for k, run in enumerate(got) for r in run}
    close = ((proj[:, :, None] - proj[:, None, :]).abs() <= gap).all(0)
    pairs = torch.nonzero(close).tolist()
    assert all(bucket[a] == bucket[b] for a, b in pairs)


def test_spread_bounds_every_pair_of_a_group():
    R, order = clustered_rows()
    for grp in group_rows(R, order, 1e-5):
        rows = R[grp.rows]
        lead = rows[0]
        assert grp.rows[0] == min(grp.rows, key=lambda r: int(torch.nonzero(order == r)))  # the leader comes first
        if len(grp.rows) == 1:
            assert grp.spread == 0.0
            continue
        smallest = float(rows.norm(dim=1).min())
        assert abs(grp.spread - float((rows - lead).norm(dim=1).max()) / smallest) <= 1e-12 * grp.spread
        pairs = torch.cdist(rows, rows)
        assert float(pairs.max()) <= 2 * grp.spread * smallest * (1 + 1e-12)


def test_implied_inputs_read_in_pieces_equal_the_float64_ratio():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(3 * ROW_CHUNK + 11, 40, generator=gen)  # float32, as a client sends it
    idx = torch.randperm(len(G), generator=gen)[: 2 * ROW_CHUNK + 5]
    divisor = torch.randn(len(idx), generator=gen, dtype=torch.float64)
    want = G.double()[idx] / divisor[:, None]
    R = ImpliedInputs(G, idx, divisor)
    sel = torch.arange(len(idx))
    assert torch.equal(R.rows(sel), want)
    assert torch.equal(torch.cat([rows for _, rows in R.pieces()]), want)
    point = want[7]
    assert torch.allclose(R.distances(sel, point), (want - point).norm(dim=1), rtol=1e-14, atol=0)
    assert torch.allclose(R.mean(sel[3:]), want[3:].mean(0), rtol=1e-12, atol=1e-15)
    held, scan = R.held()  # small: converted once, the same values, scanned on the way
    assert held.divisor is None and held.is_matrix and torch.equal(held.rows(sel), want)
    again = R.scan()
    assert torch.equal(scan.norms, again.norms) and torch.equal(scan.proj, again.proj)
    assert torch.allclose(scan.norms, want.norm(dim=1), rtol=1e-14, atol=0)
    unit = want / want.norm(dim=1, keepdim=True)
    assert torch.allclose(scan.proj, scan.V @ unit.T, rtol=1e-12, atol=1e-14)
    # a held matrix reads most of its rows as views (no gather): the same distances, the same mean to rounding
    most = torch.randperm(len(idx), generator=gen)[: len(idx) - 9]
    assert torch.equal(held.distances(most, point), (want[most] - point).norm(dim=1))
    assert torch.allclose(held.mean(most), want[most].mean(0), rtol=1e-13, atol=1e-15)
    few = most[:5]  # a few rows: gathered
    assert torch.equal(held.distances(few, point), (want[few] - point).norm(dim=1))
    assert torch.allclose(held.mean(few), want[few].mean(0), rtol=1e-13, atol=1e-15)
    big = ImpliedInputs(torch.zeros(HELD_BYTES // 8 // 40 + 1, 40), torch.arange(HELD_BYTES // 8 // 40 + 1),
                        torch.ones(HELD_BYTES // 8 // 40 + 1, dtype=torch.float64))
    assert big.held()[0] is big  # too large to hold: read a piece at a time


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_a_tight_group_skips_the_medoid_with_the_same_result(digits, monkeypatch, batch):
    """A group whose rows all lie within half the core radius of its leader is all core whichever row is the
    medoid: skipping the medoid changes nothing the attack returns."""
    from fedleak.attacks.exact import candidates

    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(batch, seed=3)
    update = fedleak.compute_gradient_update(model, x, y)
    fast = fedleak.reconstruct(model, update)
    monkeypatch.setattr(candidates, "CORE_MARGIN", -1.0)  # every group of three or more rows seeks its medoid
    slow = fedleak.reconstruct(model, update)
    assert int(fast.certified.sum()) >= 1
    assert torch.equal(fast.inputs, slow.inputs) and torch.equal(fast.certified, slow.certified)
    assert [s.witnesses for s in fast.samples] == [s.witnesses for s in slow.samples]
