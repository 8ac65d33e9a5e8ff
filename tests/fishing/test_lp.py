"""The per-sample LP: the dual-Newton radius is the exact minimal L-infinity radius, for every backend."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog

from fedleak.fishing import available_solvers
from fedleak.fishing.lp import LPSettings, RadiusLP, min_radius


def _problem(seed: int, d: int = 60, r: int = 6):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, d) * (rng.random(d) < 0.6)
    V = rng.normal(0, 1, (r, d))
    C = V @ x + rng.uniform(0.5, 2.0, r)  # every row needs a push
    return x, V, C


def _direct_radius(x, V, C):
    """min t s.t. V x' >= C, |x' - x| <= t, 0 <= x' <= 1, written with the 2d norm rows."""
    d = len(x)
    c = np.r_[np.zeros(d), 1.0]
    eye = np.eye(d)
    A = np.vstack([np.c_[-V, np.zeros(len(C))], np.c_[eye, -np.ones(d)], np.c_[-eye, -np.ones(d)]])
    b = np.r_[-C, x, -x]
    res = linprog(c, A_ub=A, b_ub=b, bounds=[(0, 1)] * d + [(0, None)], method="highs")
    return res.fun if res.status == 0 else np.inf


@pytest.mark.parametrize("seed", range(4))
def test_newton_radius_is_exact(seed):
    x, V, C = _problem(seed)
    lp = RadiusLP(x, LPSettings())
    lp.add(V, C)
    status, t, xp = lp.radius()
    assert status == "optimal"
    assert t == pytest.approx(_direct_radius(x, V, C), rel=1e-6, abs=1e-9)
    assert (V @ xp >= C - 1e-7).all() and np.abs(xp - x).max() <= t + 1e-9
    assert xp.min() >= -1e-12 and xp.max() <= 1 + 1e-12
    assert lp.solves <= 12  # a handful of warm-started LPs, not a bisection


def test_single_row_radius_matches_lp():
    x, V, C = _problem(9, r=3)
    for k in range(3):
        assert min_radius(V[k : k + 1], C[k : k + 1], x, 1.0)[0] == pytest.approx(
            _direct_radius(x, V[k : k + 1], C[k : k + 1]), rel=1e-9, abs=1e-12)


def test_infeasible_rows_are_proved_infeasible():
    x, V, C = _problem(2, r=2)
    V = np.vstack([V[0], -V[0]])
    C = np.r_[V[0] @ x + 1.0, -(V[0] @ x) + 1.0]  # push the same direction up and down at once
    lp = RadiusLP(x, LPSettings())
    lp.add(V, C)
    status, t, xp = lp.radius()
    assert status == "infeasible" and xp is None


def test_budget_status():
    x, V, C = _problem(3)
    t_star = _direct_radius(x, V, C)
    lp = RadiusLP(x, LPSettings(budget=t_star / 2))
    lp.add(V, C)
    assert lp.radius()[0] == "budget"


def test_l1_polish_is_sparser_at_similar_radius():
    x, V, C = _problem(5)
    lp = RadiusLP(x, LPSettings())
    lp.add(V, C)
    _, t, xinf = lp.radius()
    status, xl1 = lp.l1(1.25 * t)
    assert status == "optimal"
    assert (V @ xl1 >= C - 1e-6).all() and np.abs(xl1 - x).max() <= 1.25 * t + 1e-9
    assert np.abs(xl1 - x).sum() <= np.abs(xinf - x).sum() + 1e-9


@pytest.mark.parametrize("solver", sorted(set(available_solvers()) - {"highs"}))
def test_backends_agree(solver):
    x, V, C = _problem(1, d=40, r=4)
    ref = _direct_radius(x, V, C)
    lp = RadiusLP(x, LPSettings(solver=solver))
    lp.add(V, C)
    status, t, _ = lp.radius()
    assert status == "optimal"
    assert t == pytest.approx(ref, rel=1e-4, abs=1e-6)
