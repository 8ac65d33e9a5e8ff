"""LP backends for the fishing and exclusivity-reduction LPs, behind one small session interface.

Every per-sample LP fedleak writes has the same shape: a few dense rows over the input pixels
(``lo <= A x <= hi``) and box bounds on every variable; between solves only the bounds change (the
L-infinity radius) or rows are added (lazily generated constraints). A backend opens an
:class:`LPSession` that keeps the model, so a solver that can warm-start (HiGHS dual simplex) re-solves
in a few iterations; stateless backends rebuild the model on every solve.

Registered backends (``available_solvers()``; measured numbers in docs/fishing.md):

* ``"highs"``      highspy, dual simplex, warm-started across bound changes and added rows (default).
* ``"highs-ipm"``  highspy, interior point (no warm start; robust on large dense LPs).
* ``"pdlp"``       OR-Tools PDLP, first-order (approximate, ~1e-7 relative; built for huge sparse LPs).
* ``"glop"``       OR-Tools GLOP primal/dual simplex (rebuilt per solve).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedleak.errors import SolverError
from fedleak.registry import Registry

INF = float("inf")


@dataclass(frozen=True)
class LPSolution:
    """Outcome of one solve. ``status`` is "optimal", "infeasible", "time_limit" or "error:<text>".

    ``row_dual`` holds one multiplier per row (sign as the backend reports it; callers use magnitudes).
    """

    status: str
    x: np.ndarray | None
    row_dual: np.ndarray | None
    objective: float
    iterations: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "optimal"


class LPSession:
    """``min/max cost·x  s.t.  row_lo <= A x <= row_hi,  lb <= x <= ub``, modified in place."""

    def __init__(self, cost: np.ndarray, lb: np.ndarray, ub: np.ndarray, *, maximize: bool, time_limit: float):
        self.cost = np.asarray(cost, dtype=np.float64)
        self.lb = np.asarray(lb, dtype=np.float64).copy()
        self.ub = np.asarray(ub, dtype=np.float64).copy()
        self.maximize = maximize
        self.time_limit = float(time_limit)
        self.A = np.zeros((0, len(self.cost)))
        self.row_lo = np.zeros(0)
        self.row_hi = np.zeros(0)

    @property
    def num_rows(self) -> int:
        return int(self.A.shape[0])

    def add_rows(self, A: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        A = np.atleast_2d(np.asarray(A, dtype=np.float64))
        self.A = np.vstack([self.A, A])
        self.row_lo = np.concatenate([self.row_lo, np.asarray(lo, dtype=np.float64)])
        self.row_hi = np.concatenate([self.row_hi, np.asarray(hi, dtype=np.float64)])

    def set_bounds(self, lb: np.ndarray, ub: np.ndarray) -> None:
        self.lb[:] = lb
        self.ub[:] = ub

    def set_cost(self, cost: np.ndarray) -> None:
        self.cost = np.asarray(cost, dtype=np.float64).copy()

    def solve(self) -> LPSolution:  # pragma: no cover - abstract
        raise NotImplementedError


# -------------------------------------------------------------------------------------------------------
# HiGHS through highspy


def _highs_status(h, highspy) -> str:
    st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kOptimal:
        return "optimal"
    if st in (highspy.HighsModelStatus.kInfeasible,):
        return "infeasible"
    if st == highspy.HighsModelStatus.kTimeLimit:
        return "time_limit"
    return "error:" + h.modelStatusToString(st)


class HighsSession(LPSession):
    """highspy model kept alive between solves (dual simplex warm-starts from the last basis)."""

    solver_option = "simplex"

    def __init__(self, cost, lb, ub, *, maximize, time_limit):
        super().__init__(cost, lb, ub, maximize=maximize, time_limit=time_limit)
        import highspy

        self._hs = highspy
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("solver", self.solver_option)
        h.setOptionValue("time_limit", self.time_limit)
        h.setOptionValue("threads", 1)
        h.setOptionValue("presolve", "off")  # tiny LPs re-solved from a warm basis: presolve only costs time
        if self.solver_option == "simplex":
            h.setOptionValue("simplex_strategy", 1)  # dual simplex
        lp = highspy.HighsLp()
        n = len(self.cost)
        lp.num_col_ = n
        lp.num_row_ = 0
        lp.col_cost_ = self.cost
        lp.col_lower_ = self.lb
        lp.col_upper_ = self.ub
        lp.sense_ = highspy.ObjSense.kMaximize if maximize else highspy.ObjSense.kMinimize
        h.passModel(lp)
        self._h = h
        self._n = n

    def add_rows(self, A, lo, hi):
        A = np.atleast_2d(np.asarray(A, dtype=np.float64))
        super().add_rows(A, lo, hi)
        k, n = A.shape
        if k == 0:
            return
        # only the non-zeros: conv rows touch a few input values each, and highspy's time grows with k*n
        rows, idx = np.nonzero(A)
        starts = np.searchsorted(rows, np.arange(k)).astype(np.int32)
        lo = np.where(np.isfinite(lo), lo, -self._hs.kHighsInf)
        hi = np.where(np.isfinite(hi), hi, self._hs.kHighsInf)
        self._h.addRows(k, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), len(rows), starts,
                        idx.astype(np.int32), A[rows, idx])

    def set_bounds(self, lb, ub):
        super().set_bounds(lb, ub)
        self._h.changeColsBounds(self._n, np.arange(self._n, dtype=np.int32), self.lb, self.ub)

    def set_cost(self, cost):
        super().set_cost(cost)
        self._h.changeColsCost(self._n, np.arange(self._n, dtype=np.int32), self.cost)

    def solve(self) -> LPSolution:
        start = time.perf_counter()
        self._h.run()
        status = _highs_status(self._h, self._hs)
        info = self._h.getInfo()
        iters = int(info.simplex_iteration_count) + max(0, int(info.ipm_iteration_count))
        if status != "optimal":
            return LPSolution(status, None, None, float("nan"), iters, time.perf_counter() - start)
        sol = self._h.getSolution()
        return LPSolution(
            "optimal", np.array(sol.col_value), np.array(sol.row_dual), float(info.objective_function_value), iters,
            time.perf_counter() - start,
        )


class HighsIpmSession(HighsSession):
    solver_option = "ipm"


# -------------------------------------------------------------------------------------------------------
# OR-Tools model_builder (PDLP, GLOP): rebuilt on every solve


def _ortools_solve(engine, lb, ub, cost, maximize, A, row_lo, row_hi, time_limit):
    """Solve one LP with OR-Tools model_builder (runs in the worker process; numpy in, numpy out)."""
    from ortools.linear_solver.python import model_builder as mb
    from scipy.sparse import csr_matrix

    start = time.perf_counter()
    model = mb.ModelBuilder()
    k, n = A.shape
    csr = csr_matrix(A) if k else csr_matrix((0, n))
    model.helper.fill_model_from_sparse_data(lb, ub, cost, row_lo, row_hi, csr)
    if maximize:
        model.helper.set_maximize(True)
    solver = mb.ModelSolver(engine)
    solver.set_time_limit_in_seconds(time_limit)
    if engine == "pdlp":
        solver.set_solver_specific_parameters(
            "termination_criteria { simple_optimality_criteria { "
            "eps_optimal_relative: 1e-9 eps_optimal_absolute: 1e-10 } }")
    st = solver.solve(model)
    secs = time.perf_counter() - start
    if st == mb.SolveStatus.OPTIMAL:
        x = np.asarray(solver.values(model.get_variables()), dtype=np.float64)
        duals = np.asarray(solver.dual_values(model.get_linear_constraints()), dtype=np.float64) if k else np.zeros(0)
        return "optimal", x, duals, float(solver.objective_value), secs
    if st == mb.SolveStatus.INFEASIBLE:
        return "infeasible", None, None, float("nan"), secs
    if secs >= time_limit * 0.99:
        return "time_limit", None, None, float("nan"), secs
    return f"error:{st.name}", None, None, float("nan"), secs


_WORKER = None


def _ortools_worker():
    """OR-Tools 9.15 and highspy 1.15 each bundle HiGHS and cannot be loaded into one process (their
    shared libraries resolve each other's symbols and fail to import), so OR-Tools runs in one spawned
    worker process that never imports highspy."""
    global _WORKER
    if _WORKER is None:
        import atexit
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        _WORKER = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        atexit.register(_WORKER.shutdown)  # before interpreter teardown, so no callback runs into a dead module
    return _WORKER


class OrtoolsSession(LPSession):
    """Stateless OR-Tools backend: the model is rebuilt in the worker process on every solve."""

    engine = "pdlp"

    def solve(self) -> LPSolution:
        start = time.perf_counter()
        fut = _ortools_worker().submit(_ortools_solve, self.engine, self.lb, self.ub, self.cost, self.maximize,
                                       self.A, self.row_lo, self.row_hi, self.time_limit)
        status, x, duals, obj, secs = fut.result()
        del secs  # wall time (including the hop to the worker) is what a user pays
        return LPSolution(status, x, duals, obj, 0, time.perf_counter() - start)


class PdlpSession(OrtoolsSession):
    engine = "pdlp"


class GlopSession(OrtoolsSession):
    engine = "glop"


# -------------------------------------------------------------------------------------------------------
# Registry

SessionFactory = Callable[..., LPSession]
_SOLVERS: Registry[tuple[SessionFactory, str, bool]] = Registry("LP solver")


def register_solver(name: str, factory: SessionFactory, description: str, *, in_process: bool = True) -> None:
    """Make an LP backend available under ``name`` (``factory(cost, lb, ub, maximize=, time_limit=)``).
    ``in_process=False`` for a backend that already solves in a worker process of its own: fishing then
    does not fork its per-sample workers around it (a forked process must not start another pool)."""
    _SOLVERS.register(name, (factory, description, in_process))


def solves_in_process(solver: str) -> bool:
    """Whether ``solver`` solves in the calling process (so per-sample LPs may be spread over processes)."""
    return _SOLVERS.get(solver, SolverError)[2]


def available_solvers() -> dict[str, str]:
    return {name: desc for name, (_, desc, _) in sorted(_SOLVERS.items())}


def open_session(solver: str, cost, lb, ub, *, maximize: bool, time_limit: float) -> LPSession:
    factory, _, _ = _SOLVERS.get(solver, SolverError)
    return factory(cost, lb, ub, maximize=maximize, time_limit=time_limit)


def check_solver(solver: str) -> None:
    """Raise :class:`~fedleak.errors.SolverError` listing the available solvers unless ``solver`` is one."""
    _SOLVERS.get(solver, SolverError)


register_solver("highs", HighsSession, "HiGHS dual simplex via highspy, warm-started between solves (default)")
register_solver("highs-ipm", HighsIpmSession, "HiGHS interior point via highspy (no warm start)")
register_solver("pdlp", PdlpSession, "OR-Tools PDLP first-order solver (approximate, ~1e-8 relative)",
                in_process=False)
register_solver("glop", GlopSession, "OR-Tools GLOP simplex (model rebuilt on every solve)", in_process=False)
