"""fedleak.fishing.projection.project: the least-L2 point meeting V x' >= C inside a box, checked against
independent solvers (scipy SLSQP on the primal QP, HiGHS' QP solver) on small random instances."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from fedleak.fishing.projection import Projection, project

SEEDS = range(12)


def _instance(seed: int, d: int | None = None, k: int | None = None):
    """A feasible instance: rows that some point of [0, 1]^d meets (with a little slack), most of them
    violated by x, so that rows and box bounds are active at the projection."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(20, 61)) if d is None else d
    k = int(rng.integers(3, 16)) if k is None else k
    x = rng.uniform(0.0, 1.0, d)
    V = rng.normal(size=(k, d))
    x0 = rng.uniform(0.0, 1.0, d)
    C = V @ x0 - rng.uniform(0.0, 0.1, k)
    return V, C, x, np.zeros(d), np.ones(d)


def _slsqp(V, C, x, lb, ub) -> np.ndarray:
    res = minimize(lambda z: 0.5 * np.sum((z - x) ** 2), x, jac=lambda z: z - x, method="SLSQP",
                   bounds=list(zip(lb, ub)),
                   constraints=[dict(type="ineq", fun=lambda z: V @ z - C, jac=lambda z: V)],
                   options=dict(ftol=1e-14, maxiter=2000))
    assert res.success, res.message
    return res.x


def _highs_qp(V, C, x, lb, ub) -> np.ndarray:
    highspy = pytest.importorskip("highspy")
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    h.setOptionValue("dual_feasibility_tolerance", 1e-10)
    d = len(x)
    idx = np.arange(d, dtype=np.int32)
    for i in range(d):
        h.addVar(float(lb[i]), float(ub[i]))
    h.changeColsCost(d, idx, -x)  # 1/2 ||z||^2 - x.z  ==  1/2 ||z - x||^2 + const
    for r in range(len(C)):
        h.addRow(float(C[r]), highspy.kHighsInf, d, idx, V[r])
    hess = highspy.HighsHessian()
    hess.dim_ = d
    hess.format_ = highspy.HessianFormat.kTriangular
    hess.start_ = list(range(d + 1))
    hess.index_ = list(range(d))
    hess.value_ = [1.0] * d
    h.passHessian(hess)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return np.array(h.getSolution().col_value)


def _check_feasible(p: Projection, V, C, lb, ub) -> None:
    assert p.ok and p.x is not None
    assert np.all(V @ p.x >= C - 1e-7)
    assert np.all(p.x >= lb) and np.all(p.x <= ub)
    assert p.violation <= 1e-7


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_slsqp(seed):
    V, C, x, lb, ub = _instance(seed)
    assert (V @ x < C).any()  # x itself is not feasible: the projection has to move
    p = project(V, C, x, lb, ub)
    _check_feasible(p, V, C, lb, ub)
    ref = _slsqp(V, C, x, lb, ub)
    assert np.abs(p.x - ref).max() <= 1e-5
    # no point of the set is nearer (SLSQP's point is feasible too)
    assert np.linalg.norm(p.x - x) <= np.linalg.norm(ref - x) + 1e-7


@pytest.mark.parametrize("seed", SEEDS[:6])
def test_matches_highs_qp(seed):
    V, C, x, lb, ub = _instance(100 + seed)
    p = project(V, C, x, lb, ub)
    _check_feasible(p, V, C, lb, ub)
    assert np.abs(p.x - _highs_qp(V, C, x, lb, ub)).max() <= 1e-5


def test_instances_exercise_rows_and_box():
    """The random instances are not trivial: the answer sits on rows and on box faces."""
    rows_active = box_active = 0
    for seed in SEEDS:
        V, C, x, lb, ub = _instance(seed)
        p = project(V, C, x, lb, ub)
        rows_active += int((np.abs(V @ p.x - C) < 1e-6).sum())
        box_active += int(((p.x <= lb + 1e-12) | (p.x >= ub - 1e-12)).sum())
    assert rows_active >= len(SEEDS) and box_active >= len(SEEDS)


@pytest.mark.parametrize("seed", SEEDS[:6])
def test_multipliers_are_complementary(seed):
    V, C, x, lb, ub = _instance(seed)
    p = project(V, C, x, lb, ub)
    assert p.multipliers.shape == (len(C),) and np.all(p.multipliers >= 0)
    slack = V @ p.x - C
    assert np.all(np.abs(slack[p.multipliers > 1e-6]) < 1e-6)  # a row that pulls is tight
    assert np.all(p.multipliers[slack > 1e-4] < 1e-8)  # a row with slack does not pull
    assert (p.multipliers > 1e-6).any()


@pytest.mark.parametrize("seed", SEEDS[:6])
def test_warm_start_gives_the_same_point(seed):
    V, C, x, lb, ub = _instance(seed, d=40, k=12)
    first = project(V[:8], C[:8], x, lb, ub)
    assert first.ok and len(first.multipliers) == 8
    warm = project(V, C, x, lb, ub, start=first.multipliers)
    cold = project(V, C, x, lb, ub)
    _check_feasible(warm, V, C, lb, ub)
    assert np.abs(warm.x - cold.x).max() <= 1e-6
    assert np.abs(warm.x - _slsqp(V, C, x, lb, ub)).max() <= 1e-5
    # a start longer than the rows, or with negative entries, is cut and clipped
    odd = project(V, C, x, lb, ub, start=np.r_[-cold.multipliers, np.ones(5)])
    assert odd.ok and np.abs(odd.x - cold.x).max() <= 1e-6


def test_zero_rows_returns_x_itself():
    _, _, x, lb, ub = _instance(0, d=30)
    p = project(np.zeros((0, 30)), np.zeros(0), x, lb, ub)
    assert p.ok and p.violation == 0.0 and p.multipliers.shape == (0,)
    assert np.array_equal(p.x, x) and p.x is not x  # a copy


def test_rows_already_met_leave_x_unchanged():
    V, C, x, lb, ub = _instance(1, d=30, k=6)
    C = V @ x - 0.5  # every row met with slack
    p = project(V, C, x, lb, ub)
    assert p.ok and np.abs(p.x - x).max() <= 1e-12
    assert np.all(p.multipliers <= 1e-12)


def test_single_row_has_closed_form():
    """One row without active box bounds: x' = x + (c - v.x) v / ||v||^2."""
    rng = np.random.default_rng(5)
    d = 25
    x = rng.uniform(0.4, 0.6, d)
    v = rng.normal(size=d)
    c = float(v @ x) + 0.05
    p = project(v[None, :], np.array([c]), x, np.zeros(d), np.ones(d))
    assert p.ok
    assert np.abs(p.x - (x + (c - v @ x) * v / (v @ v))).max() <= 1e-9


@pytest.mark.parametrize("scale", [1e-2, 0.1, 10.0])
def test_row_scaling_does_not_change_the_point(scale):
    V, C, x, lb, ub = _instance(3, d=40, k=12)
    base = project(V, C, x, lb, ub)
    scaled = project(V * scale, C * scale, x, lb, ub)
    assert scaled.ok and np.abs(scaled.x - base.x).max() <= 1e-6


def test_large_row_norms_still_converge():
    V, C, x, lb, ub = _instance(3, d=40, k=12)
    scaled = project(V * 1e3, C * 1e3, x, lb, ub)
    assert scaled.ok


def test_other_box():
    V, C, x, _, _ = _instance(7, d=35, k=8)
    lb, ub = np.full(35, -1.0), np.full(35, 2.0)
    p = project(V, C, x, lb, ub)
    _check_feasible(p, V, C, lb, ub)
    assert np.abs(p.x - _slsqp(V, C, x, lb, ub)).max() <= 1e-5


def test_infeasible_row_against_the_box():
    d = 20
    x = np.random.default_rng(0).uniform(0.0, 1.0, d)
    V = np.zeros((1, d))
    V[0, 0] = 1.0
    p = project(V, np.array([2.0]), x, np.zeros(d), np.ones(d))  # x'_0 >= 2 with x'_0 <= 1
    assert not p.ok and p.x is None
    assert p.violation == pytest.approx(1.0, abs=1e-6)  # the best it can do is x'_0 = 1


def test_infeasible_pair_of_rows():
    d = 20
    x = np.random.default_rng(1).uniform(0.0, 1.0, d)
    V = np.zeros((2, d))
    V[0, 0], V[1, 0] = 1.0, -1.0
    p = project(V, np.array([0.8, -0.2]), x, np.zeros(d), np.ones(d))  # x'_0 >= 0.8 and x'_0 <= 0.2
    assert not p.ok and p.x is None and p.violation > 0.1
