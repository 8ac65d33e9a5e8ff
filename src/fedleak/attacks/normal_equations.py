"""Least squares with a *proven* lower bound on the smallest singular value, for the sparse systems ``J x = b``
of conv blocks (``J``: the rows of the unrolled conv whose units are known).

Both solvers factor the normal matrix ``N = J^T J``:

- :class:`BandedNormal` -- LAPACK band Cholesky of ``N`` in pixel-major order (see
  :mod:`fedleak.nets.conv_gram`); milliseconds for the layers of LeNet/ConvNet size.
- :class:`SparseNormal` -- SuperLU with a symmetric ordering and diagonal pivots only (an ``LDL^T``), for
  systems whose band would be too wide.

**The proof.** ``lambda_min(N)`` is estimated by inverse iteration; then ``N - tau I`` is factored for a
``tau`` just below it. A successful factorisation with positive pivots proves ``N - tau I + E`` positive
definite, ``E`` the factorisation's backward error, so ``sigma_min(J)^2 >= tau - ||E|| - ||N - J^T J||``.
Both error terms are bounded by the standard a-priori bounds (Higham, *Accuracy and Stability*, Thm 10.3
for Cholesky; ``gamma_k ||J||_F^2`` for forming ``N`` from sums of at most ``k`` products) and subtracted,
so rounding in our own float64 arithmetic cannot make the bound too optimistic.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sl
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from fedleak.threads import blas_threads

EPS64 = float(np.finfo(np.float64).eps)
# band factorisation is used while n * bandwidth^2 (its flop count) stays below this (measured on one core:
# 7.6 ms at n=3750, bandwidth 317; 0.29 s at n=12288, bandwidth 803; SuperLU was 5-20x slower on both)
BAND_WORK = 2e10
_SHIFTS = (0.5, 0.1, 0.01)  # tau as fractions of the estimated lambda_min, tried in turn
_INVERSE_ITERATIONS = 15


def _gamma(k: int) -> float:
    return k * EPS64 / (1 - k * EPS64)


def _estimate_lambda_min(solve, n: int) -> float:
    """Inverse iteration with the factor of ``N`` (the estimates approach ``lambda_min`` from above)."""
    y = np.random.default_rng(0).standard_normal(n)
    lam = math.inf
    for _ in range(_INVERSE_ITERATIONS):
        y = y / np.linalg.norm(y)
        z = solve(y)
        new = 1.0 / max(float(np.linalg.norm(z)), 1e-300)
        y = z
        if abs(new - lam) <= 1e-3 * new:
            return new
        lam = new
    return lam


class _NormalEquations:
    """Shared least-squares solve and proof; subclasses provide the factorisation of ``N - tau I``."""

    def __init__(self, J: sp.csr_matrix, max_terms: int):
        self.J = J
        self.n = J.shape[1]
        self._frob_j = float(J.data @ J.data)
        self._max_terms = max_terms
        self._factor0 = None

    def _factor(self, tau: float):  # the factor of N - tau I, or None when it is not positive definite
        raise NotImplementedError

    def _apply(self, factor, v: np.ndarray) -> np.ndarray:  # (N - tau I)^{-1} v, natural order
        raise NotImplementedError

    def _factor_error(self, factor) -> float:  # a bound on the 2-norm of the factorisation's backward error
        raise NotImplementedError

    def _max_diag(self) -> float:
        raise NotImplementedError

    def lstsq(self, rhs: np.ndarray) -> np.ndarray | None:
        """Least-squares solution of ``J x = rhs`` (one refinement step), or None when ``N`` is not PD."""
        f = self._factor0 = self._factor(0.0)
        if f is None:
            return None
        x = self._apply(f, self.J.T @ rhs)
        return x + self._apply(f, self.J.T @ (rhs - self.J @ x))

    def sigma_lower(self) -> float:
        """A proven lower bound on ``sigma_min(J)`` (0.0 when none); call after :meth:`lstsq`."""
        f0 = self._factor0
        if f0 is None:
            return 0.0
        lam = _estimate_lambda_min(lambda v: self._apply(f0, v), self.n)
        if not np.isfinite(lam) or lam <= 0:
            return 0.0
        forming = _gamma(self._max_terms + 2) * self._frob_j
        for frac in _SHIFTS:
            tau = frac * lam
            f = self._factor(tau)
            if f is not None:
                slack = forming + self._factor_error(f) + EPS64 * (self._max_diag() + tau)
                return math.sqrt(tau - slack) if tau > slack else 0.0
        return 0.0


class BandedNormal(_NormalEquations):
    """``N = J^T J`` given in lower band storage ``ab`` of the permuted unknowns ``x[order]``, factored by
    LAPACK's band Cholesky. ``max_terms``: the most products summed into one entry of ``N``."""

    def __init__(self, J: sp.csr_matrix, ab: np.ndarray, order: np.ndarray, max_terms: int):
        super().__init__(J, max_terms)
        self.ab, self.order = ab, order
        self.bandwidth = ab.shape[0] - 1

    def _factor(self, tau: float) -> np.ndarray | None:
        a = self.ab.copy()
        a[0] -= tau
        try:
            with blas_threads(1):  # band factorisations are too small to gain from threads (2x slower on 2)
                return sl.cholesky_banded(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:  # not positive definite
            return None

    def _apply(self, cb: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.empty_like(v)
        out[self.order] = sl.cho_solve_banded((cb, True), v[self.order], check_finite=False)
        return out

    def _factor_error(self, cb: np.ndarray) -> float:
        return _gamma(self.bandwidth + 1) * float((cb * cb).sum())  # gamma ||R||_F^2 >= gamma || |R^T||R| ||_2

    def _max_diag(self) -> float:
        return float(np.abs(self.ab[0]).max())


class SparseNormal(_NormalEquations):
    """``N = J^T J`` factored by SuperLU (symmetric ordering, diagonal pivots only: an ``LDL^T``, so all
    pivots positive proves ``N - tau I`` positive definite by Sylvester's criterion)."""

    def __init__(self, J: sp.csr_matrix, N: sp.spmatrix | None = None):
        super().__init__(J, int(np.diff(J.tocsc().indptr).max(initial=1)))
        self.N = (J.T @ J).tocsc() if N is None else N.tocsc()

    def _factor(self, tau: float):
        M = self.N - tau * sp.identity(self.n, format="csc") if tau else self.N
        try:
            lu = spla.splu(M, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options=dict(SymmetricMode=True))
        except RuntimeError:  # exactly singular
            return None
        if not np.array_equal(lu.perm_r, lu.perm_c) or not bool((lu.U.diagonal() > 0).all()):
            return None
        return lu

    def _apply(self, lu, v: np.ndarray) -> np.ndarray:
        return lu.solve(v)

    def _factor_error(self, lu) -> float:
        depth = int(np.diff(lu.L.tocsc().indptr).max(initial=1)) + 1
        return _gamma(depth) * float(spla.norm(lu.L) * spla.norm(lu.U))

    def _max_diag(self) -> float:
        return float(np.abs(self.N.diagonal()).max())


def normal_equations(J: sp.csr_matrix, order: np.ndarray, ab: np.ndarray | None = None,
                     max_terms: int | None = None) -> BandedNormal | SparseNormal:
    """The normal equations of ``J`` with the fastest applicable factorisation.

    ``order``: the unknowns' pixel-major order; ``ab``: ``J^T J`` already in band storage for that order
    (from :class:`~fedleak.nets.conv_gram.ConvGram`), else it is formed here."""
    J = J.tocsr()
    n = J.shape[1]
    if ab is not None and n * (ab.shape[0] - 1) ** 2 <= BAND_WORK:
        return BandedNormal(J, ab, order, max_terms or int(np.diff(J.tocsc().indptr).max(initial=1)))
    inv = np.empty_like(order)
    inv[order] = np.arange(n)
    N = (J.T @ J).tocoo()
    if N.nnz:
        r, c = inv[N.row], inv[N.col]
        low = r >= c
        bw = int((r[low] - c[low]).max())
        if n * bw * bw <= BAND_WORK:
            band = np.zeros((bw + 1, n))
            np.add.at(band, (r[low] - c[low], c[low]), N.data[low])
            return BandedNormal(J, band, order, int(np.diff(J.tocsc().indptr).max(initial=1)))
    return SparseNormal(J, N)
