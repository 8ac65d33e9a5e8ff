"""Per-sample activation-pattern LPs: sign requirements on chosen neurons, solved with few rows.

A *requirement* asks that neuron ``j`` of hidden layer ``h`` has pre-activation ``sign * z >= margin``
for one sample. Inside a fixed activation region of the layers below ``h`` the pre-activation is affine
in the input, ``z = J x + c`` (``J`` is the product of the weight matrices with the region's 0/1
patterns), so a set of requirements is a set of linear rows on the perturbed input ``x'``. The LP then
finds the smallest perturbation of ``x`` that meets them while ``x'`` stays in the data range
``[lo, hi]`` (:class:`LPSettings`; [0, 1] unless the caller says otherwise).

How the LP stays small and fast (design, measured in docs/fishing.md):

* **The L-infinity ball is in the variable bounds, never in rows.** For a radius ``t`` the feasible set
  of ``x'`` is the box ``max(lo, x - t) <= x' <= min(hi, x + t)``. We solve the *max-margin* LP
  ``F(t) = max s  s.t.  sign_k (J_k x' + c_k) - margin_k >= s`` (one row per requirement, no 2·d norm
  rows). ``F`` is concave and non-decreasing in ``t``; the smallest feasible radius is the root of ``F``.
* **Dual Newton on t.** The LP's row multipliers ``lambda`` (non-negative, summing to 1) give a concave
  upper bound ``G_lambda(t) = max_{x' in box(t)} lambda^T (rows)`` of ``F`` that is exact at the
  current ``t``; its root (a 1-D piecewise-linear equation, solved exactly by sorting breakpoints) is a
  *lower bound* of the optimal radius and the next iterate. Iterates rise monotonically to the exact
  minimal radius in a handful of warm-started LPs; ``G_lambda`` never reaching 0 within the budget
  *proves* infeasibility (a Farkas certificate), so a failure is a fact, not a time-out.
* **L1 polish.** At the minimal radius an L-infinity vertex moves most pixels by ``±t``. A second LP
  minimises ``sum |x' - x|`` with the radius cap ``(1 + polish_slack) t`` in the bounds (split
  variables, still only the requirement rows): the same guarantee with a sparse perturbation and a far
  higher PSNR.
* **Least L2 instead** (``norm="l2"``, the default): :meth:`RadiusLP.l2` projects ``x`` onto the rows inside
  the box (:mod:`fedleak.fishing.projection`); the radius LP then only proves infeasibility when the
  projection cannot reach the rows.

Which rows are written, and the forward check of every solution, are in :mod:`fedleak.fishing.sample_lp`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from fedleak.errors import SolverError
from fedleak.fishing.projection import project
from fedleak.fishing.solvers import LPSession, open_session
from fedleak.option_fields import validate_fields

F_TOL = 1e-9
#: how far the L1 polish may fall short of a row (in the row's units): it starts from the radius LP's point, which
#: meets its rows only to the solver's tolerance
POLISH_SLACK = 1e-7


@contextmanager
def single_threaded_blas():
    """The per-sample work is thousands of small mat-vecs: a multi-threaded BLAS on a shared 2-core
    machine makes each one 50x slower (measured 12 ms vs 0.2 ms for 1024x784), so pin BLAS to one
    thread (parallelism comes from solving samples concurrently instead)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@dataclass(frozen=True)
class Requirement:
    """``sign * z[layer][neuron] >= margin`` for one sample; ``layer`` counts the layers of its
    :class:`~fedleak.fishing.sample_net.SampleNet` from 0 (conv layers first, then the head's hidden layers)."""

    layer: int
    neuron: int
    sign: int
    margin: float


@dataclass(frozen=True)
class LPSettings:
    norm: str = "l2"  # "l2" (least L2: highest PSNR), "linf" (min radius, then L1 polish) or "l1"
    budget: float | None = None  # largest allowed L-infinity perturbation, data units (None: only the range)
    min_psnr: float | None = None  # PSNR floor of the perturbation (dB, peak = hi - lo)
    polish: bool = True
    polish_slack: float = 0.25
    check_fraction: float = 0.5  # a requirement is met when sign*z >= check_fraction*margin (float32 and float64)
    region_margin: float = 0.0  # units of lower layers kept on their side of the region are kept this far from 0
    walk_rounds: int = 3  # rounds in which a lower unit that changes side moves the region instead of being held
    screen: float = 2.0  # lazy rows within screen*margin of violation at the start are written up front
    max_rounds: int = 12
    max_newton: int = 40
    solver: str = "highs"
    time_limit: float = 10.0
    lo: float = field(default=0.0, metadata={"low": None})  # the data range every perturbed value stays in
    hi: float = field(default=1.0, metadata={"low": None})

    def __post_init__(self) -> None:
        validate_fields(self, error=SolverError)
        if not self.lo < self.hi:
            raise SolverError(f"the data range must have lo < hi, got [{self.lo:g}, {self.hi:g}]")

    @property
    def width(self) -> float:
        return self.hi - self.lo


@dataclass
class SampleOutcome:
    """What the LP did for one sample."""

    status: str  # "optimal", "infeasible", "budget", "time_limit", "unsatisfied", "error:..."
    x: np.ndarray  # the (possibly unchanged) input, float64
    radius: float = 0.0  # minimal L-infinity radius found (linf) / L-infinity of the solution
    lp_solves: int = 0
    lp_seconds: float = 0.0
    rows: int = 0
    rounds: int = 0
    message: str = ""
    requirements_met: bool = False
    final_seconds: float = 0.0  # the last solve, with every row written (the LP floor of this sample)
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "optimal" and self.requirements_met


# -------------------------------------------------------------------------------------------------------
# The radius problem


def _box(x: np.ndarray, t: float, lo: float = 0.0, hi: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(lo, x - t), np.minimum(hi, x + t)


def min_radius(V: np.ndarray, C: np.ndarray, x: np.ndarray, cap: float, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Per row ``k``: the smallest ``t <= cap`` with ``max_{x' in box(t)} V_k x' >= C_k`` (inf if none);
    ``box(t)`` is the L-infinity ball of radius ``t`` around ``x`` inside the data range ``[lo, hi]``.

    ``max_{x' in box(t)} V_k x' = V_k x + sum_i |V_ki| min(t, L_ki)`` with ``L_ki`` the room pixel ``i``
    has in the direction of ``sign(V_ki)``; piecewise linear and concave in ``t``, solved exactly.
    """
    V = np.atleast_2d(V)
    g0 = V @ x - C
    L = np.where(V > 0, hi - x, x - lo)
    L = np.minimum(L, cap)
    w = np.abs(V)
    order = np.argsort(L, axis=1)
    Ls = np.take_along_axis(L, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    # G at breakpoint k: g0 + sum_{i<=k} w_i L_i + L_k * sum_{i>k} w_i
    cwl = np.cumsum(ws * Ls, axis=1)
    cw = np.cumsum(ws, axis=1)
    total = cw[:, -1:]
    G = g0[:, None] + cwl + Ls * (total - cw)
    out = np.full(V.shape[0], np.inf)
    done = g0 >= 0
    out[done] = 0.0
    reach = (G[:, -1] >= 0) & ~done
    if reach.any():
        k = np.argmax(G[reach] >= 0, axis=1)
        rows = np.nonzero(reach)[0]
        # on segment [L_{k-1}, L_k]: G(t) = g0 + sum_{i<k} w_i L_i + t * sum_{i>=k} w_i
        prev_cwl = np.where(k > 0, cwl[rows, np.maximum(k - 1, 0)], 0.0)
        prev_cw = np.where(k > 0, cw[rows, np.maximum(k - 1, 0)], 0.0)
        slope = total[rows, 0] - prev_cw
        t = -(g0[rows] + prev_cwl) / np.maximum(slope, 1e-300)
        start = np.where(k > 0, Ls[rows, np.maximum(k - 1, 0)], 0.0)
        out[rows] = np.clip(t, start, Ls[rows, k])
    return out


class RadiusLP:
    """Minimal L-infinity radius (dual Newton) and L1 polish for one sample, with rows added lazily."""

    def __init__(self, x: np.ndarray, settings: LPSettings):
        self.x = x
        self.s = settings
        self.lo, self.hi = settings.lo, settings.hi
        self.cap = settings.width if settings.budget is None else min(float(settings.budget), settings.width)
        self.capped = settings.budget is not None and self.cap < settings.width  # failing is "budget"
        self.V = np.zeros((0, len(x)))
        self.C = np.zeros(0)
        self._margin_lp: LPSession | None = None
        self._polish_lp: LPSession | None = None
        self.solves = 0
        self.lp_seconds = 0.0
        self.t = 0.0
        self._lam: np.ndarray | None = None
        self.last_seconds = 0.0  # the last solve: what one solve costs with every row written

    def add(self, V: np.ndarray, C: np.ndarray) -> None:
        """Add rows ``V x' >= C``."""
        V = np.atleast_2d(V)
        self.V = np.vstack([self.V, V])
        self.C = np.concatenate([self.C, C])
        if self._margin_lp is not None:
            self._margin_lp.add_rows(np.hstack([V, -np.ones((len(C), 1))]), C, np.full(len(C), np.inf))
        if self._polish_lp is not None:
            self._polish_lp.add_rows(np.hstack([V, -V]), C - V @ self.x - POLISH_SLACK, np.full(len(C), np.inf))


    def _solve(self, lp: LPSession):
        sol = lp.solve()
        self.solves += 1
        self.lp_seconds += sol.seconds
        self.last_seconds = sol.seconds
        return sol

    def _margin_session(self) -> LPSession:
        if self._margin_lp is None:
            d = len(self.x)
            cost = np.zeros(d + 1)
            cost[-1] = 1.0
            lb, ub = _box(self.x, self.t, self.lo, self.hi)
            lp = open_session(self.s.solver, cost, np.r_[lb, -1e6], np.r_[ub, 1e6], maximize=True,
                              time_limit=self.s.time_limit)
            lp.add_rows(np.hstack([self.V, -np.ones((len(self.C), 1))]), self.C, np.full(len(self.C), np.inf))
            self._margin_lp = lp
        return self._margin_lp

    def radius(self) -> tuple[str, float, np.ndarray | None]:
        """Smallest radius at which every row holds; (status, t, x' at that radius)."""
        failed = "budget" if self.capped else "infeasible"
        single = min_radius(self.V, self.C, self.x, self.cap, self.lo, self.hi)
        t = max(self.t, float(single.max()) if len(single) else 0.0)
        if not np.isfinite(t):
            return failed, np.inf, None
        lp = self._margin_session()
        for _ in range(self.s.max_newton):
            lb, ub = _box(self.x, t, self.lo, self.hi)
            lp.set_bounds(np.r_[lb, -1e6], np.r_[ub, 1e6])
            sol = self._solve(lp)
            if not sol.ok:
                return sol.status, t, None
            F = sol.objective
            if F >= -F_TOL:
                self.t = t
                return "optimal", t, sol.x[:-1]
            lam = np.abs(sol.row_dual)
            if lam.sum() <= 0:
                t_new = t * 1.01 + 1e-6
            else:
                lam = lam / lam.sum()
                t_new = float(min_radius((lam @ self.V)[None, :], np.array([lam @ self.C]), self.x, self.cap,
                                         self.lo, self.hi)[0])
                if not np.isfinite(t_new):
                    # the multipliers certify that no radius within the cap satisfies the rows
                    return failed, np.inf, None
                if t_new <= t * (1 + 1e-12):
                    t_new = t * (1 + 1e-6) + 1e-9
            if t_new > self.cap:
                return failed, np.inf, None
            t = t_new
        return "error:newton did not converge", t, None

    def l2(self, tol: float = 1e-7) -> tuple[str, np.ndarray | None]:
        """Least L2 perturbation meeting the rows inside the data range and the budget (the dual projection of
        :mod:`fedleak.fishing.projection`, warm-started from the last multipliers); "unconverged" when the
        dual does not reach the rows (the caller then asks :meth:`radius`, which proves infeasibility)."""
        lb, ub = _box(self.x, self.cap, self.lo, self.hi)
        reach = np.clip(self.V, 0.0, None) @ ub + np.clip(self.V, None, 0.0) @ lb  # each row's best in the box
        if (reach < self.C).any():
            return "unconverged", None  # a row no point of the box meets: the LP proves it at once
        res = project(self.V, self.C, self.x, lb, ub, tol=tol, start=self._lam)
        self._lam = res.multipliers
        self.solves += 1
        self.lp_seconds += res.seconds
        self.last_seconds = res.seconds
        return ("optimal", res.x) if res.ok else ("unconverged", None)

    def l1(self, cap: float) -> tuple[str, np.ndarray | None]:
        """Least L1 perturbation with L-infinity at most ``cap`` (split variables, cap in the bounds)."""
        d = len(self.x)
        ub = np.r_[np.minimum(cap, self.hi - self.x), np.minimum(cap, self.x - self.lo)]
        ub = np.maximum(ub, 0.0)
        if self._polish_lp is None:
            lp = open_session(self.s.solver, np.ones(2 * d), np.zeros(2 * d), ub, maximize=False,
                              time_limit=self.s.time_limit)
            lp.add_rows(np.hstack([self.V, -self.V]), self.C - self.V @ self.x - POLISH_SLACK,
                        np.full(len(self.C), np.inf))
            self._polish_lp = lp
        else:
            self._polish_lp.set_bounds(np.zeros(2 * d), ub)
        sol = self._solve(self._polish_lp)
        if not sol.ok:
            return sol.status, None
        return "optimal", self.x + sol.x[:d] - sol.x[d:]
