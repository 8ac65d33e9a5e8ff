"""The least-L2 perturbation that meets a set of rows: a projection onto a polyhedron inside a box.

``min ||x' - x||^2  s.t.  V x' >= C,  lb <= x' <= ub`` has one multiplier per row and none per pixel once
the box is kept in the inner minimisation: for multipliers ``lam >= 0`` the best step is
``delta(lam) = clip(V^T lam, lb - x, ub - x)`` (the box is separable), and the dual

    g(lam) = 1/2 ||delta||^2 - lam^T (V delta - r),   r = C - V x,   grad g = r - V delta(lam)

is concave and piecewise quadratic in ``k`` variables (``k`` = rows, tens to hundreds) instead of the
``d`` pixels. It is maximised with L-BFGS-B over ``lam >= 0``, warm-started from the last multipliers when
rows are added. The minimiser is the perturbation of least mean squared error, i.e. of highest PSNR, that
meets the rows. The dual gives no infeasibility proof; a run that does not reach the rows within ``tol``
says so, and the caller falls back to the LP (:meth:`fedleak.fishing.lp.RadiusLP.radius`), which proves
infeasibility or finds a point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize


@dataclass(frozen=True)
class Projection:
    """``x``: the projected point (None unless ``ok``); ``violation``: the largest row shortfall, each row scaled to
    unit L2 norm (a distance in input units)."""

    x: np.ndarray | None
    multipliers: np.ndarray
    violation: float
    iterations: int
    seconds: float
    ok: bool


def project(V: np.ndarray, C: np.ndarray, x: np.ndarray, lb: np.ndarray, ub: np.ndarray, *, tol: float = 1e-7,
            start: np.ndarray | None = None, max_iter: int = 1000) -> Projection:
    """The point of ``{x' : V x' >= C, lb <= x' <= ub}`` nearest to ``x`` in L2 (``x`` itself inside ``[lb, ub]``);
    ``tol`` bounds each row's shortfall after scaling it to unit norm."""
    t0 = time.perf_counter()
    k = len(C)
    if k == 0:
        return Projection(x.copy(), np.zeros(0), 0.0, 0, time.perf_counter() - t0, True)
    scale = np.maximum(np.linalg.norm(V, axis=1), 1e-300)
    Vn, r = V / scale[:, None], (C - V @ x) / scale  # unit rows: the dual is far better conditioned
    lo, hi = lb - x, ub - x
    lam0 = np.zeros(k) if start is None else np.maximum(np.r_[start, np.zeros(max(0, k - len(start)))][:k], 0.0)

    def negdual(lam: np.ndarray) -> tuple[float, np.ndarray]:
        d = np.clip(Vn.T @ lam, lo, hi)
        Vd = Vn @ d
        return -(0.5 * d @ d - lam @ (Vd - r)), Vd - r

    sol = minimize(negdual, lam0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * k,
                   options=dict(maxiter=max_iter, gtol=1e-12, ftol=1e-16, maxcor=20))
    lam = np.maximum(sol.x, 0.0)
    d = np.clip(Vn.T @ lam, lo, hi)
    violation = float(np.max(r - Vn @ d))
    ok = violation <= tol
    return Projection(x + d if ok else None, lam, violation, int(sol.nit), time.perf_counter() - t0, ok)
