"""Least squares on a conv block's known units with a *proven* lower bound on ``sigma_min``, from one float32
band Cholesky factorisation.

The system is ``J x = rhs``, ``J = A[rows]`` the rows of the block's unrolled conv whose units are known, and its
normal matrix ``N = J^T J = A^T diag(w) A`` is given in band storage by :class:`~fedleak.nets.conv_gram.ConvGram`.

**The proof.** ``fl32(N - tau I)`` is factored by LAPACK's float32 band Cholesky (``spbtrf``, half the time of
float64). Success means ``L L^T = N - tau I + F + D + E`` is positive definite, where

- ``F`` is the error of forming ``N`` in float64: ``||F||_2 <= gamma_{k+2} ||J||_F^2`` (``k`` the most products
  summed into one entry; ``||J||_F^2 = trace(N)``);
- ``D`` is the rounding of ``N - tau I`` to float32: ``|D| <= u32 |N - tau I|``, so
  ``||D||_2 <= u32 ||N - tau I||_F <= u32 (||N||_F + tau sqrt(n))``;
- ``E`` is the factorisation's backward error in float32 arithmetic: ``|E| <= gamma_{b+2} |L| |L^T|`` (Higham,
  *Accuracy and Stability of Numerical Algorithms*, Thm 10.3, whose ``gamma_{n+1}`` counts ``n - 1`` products
  and the square root's two roundings; ``b`` the half-bandwidth, so a diagonal entry sums at most ``b``
  products, and an entry below it at most ``b - 1`` before its division, or its scaling by a rounded
  reciprocal as LAPACK's ``xPOTF2`` and OpenBLAS's triangular solves do: two roundings), and
  ``|| |L| |L^T| ||_2`` is at most the largest entry of ``|L| (|L^T| 1)`` (the 2-norm of a symmetric
  non-negative matrix is at most its largest row sum; two triangular band products).

So ``sigma_min(J)^2 >= tau - slack``, ``slack`` the sum of those bounds, each rounded up: our own rounding cannot
make the bound optimistic. Where float32 cannot give the proof (``slack > tau / 4``: an ill-conditioned block, such
as a 12-channel layer on 32x32 colour images), the float32 solve is kept and ``sigma`` is proven by one float64
factorisation of ``N - tau I`` (:func:`sigma64`: the same bound with ``D = 0``); only where that fails too, or a
float32 factorisation fails twice, :func:`proven_lstsq` returns None and the caller solves in float64 throughout
(:mod:`fedleak.attacks.normal_equations`). A test checks the slack against the real error.

**The solve.** Conjugate gradients on ``N x = J^T rhs`` in float64 (a product with ``N`` is a conv and a
transposed conv), preconditioned by the float32 factor: for ``tau = lambda_min / 2`` the preconditioned spectrum
``lambda / (lambda - tau)`` lies in ``[1, 2]`` (about a dozen iterations), and the largest Lanczos value of the
run, ``lambda_min / (lambda_min - tau)``, gives ``lambda_min``. That estimate is the *hint* for the next system
of the same block (the samples of a batch have alike spectra), so a block costs one factorisation per sample.
Where that factor solves the system but its slack is too large for the proof at the hint's ``tau``, this run's
estimate of ``lambda_min`` picks the proof's shift (:func:`prove_solved`). Without a hint, when the hint's ``tau``
is not below this system's ``lambda_min`` (the factorisation fails) or far below it (the run's largest value under
``INFORMATIVE``: it tells little), ``N`` itself is factored in float32 (CG then needs two or three iterations), a
few Lanczos steps on ``N^{-1}`` estimate ``lambda_min``, and :func:`prove_solved` factors ``N - tau I`` for the
proof: in float32 unless the slack of a float32 factor of ``N`` is already twice what the proof allows (a shifted
factor's is about the same), else in float64. The hint only decides where the proof is tried; a wrong hint costs
time, never soundness. On the retina model of docs/cnn.md
(``make_convnet((3, 32, 32), channels=(12, 32))``, 12,288 unknowns, half-bandwidth 803) float32 never proves the top
block: its float32 factor's slack is 0.0016 against ``tau / 4 < 0.0006``, and one float64 factorisation proves
``sigma`` instead (0.35-0.45 s per sample where the float64 solver took 1.2-2.2 s; one thread, Intel Xeon).

**A tighter proof.** The same bound in float64 (:func:`proven_sigma64`: ``D = 0`` and ``E`` a float64 backward
error) is nearly ``sqrt(tau)``; the attack asks for it, for a system already solved, only where float32's looser
``sigma`` leaves the block below unproven.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sl
import torch

from fedleak.nets.conv_geometry import ConvGeometry
from fedleak.nets.scratch import work_array
from fedleak.threads import blas_threads

EPS64 = float(np.finfo(np.float64).eps)
SHIFT = 0.5  # tau as a fraction of the estimated lambda_min
RETRY_SHIFT = 0.1  # a second try when the first shift is not below lambda_min
MAX_SLACK = 0.25  # float32 proves nothing when its rounding slack exceeds this fraction of tau
INFORMATIVE = 1.01  # a hinted run's largest Lanczos value from which its lambda_min estimate picks the proof's tau
# (the hint's tau at least ~1% of lambda_min); below it the hint was far too low, and lambda_min is estimated anew
SUM_MARGIN = 1.01  # the slack's own sums of non-negative terms, some in float32 (relative error < 1e-4 here)
CG_TOL = 1e-9  # relative preconditioned residual at which conjugate gradients stop (the bound uses the true
# residual; 1e-9 of the right-hand side is far below the float32 noise the bound already carries)
CG_MAX = 40
LANCZOS_STEPS = 8
# bands of at most this many entries multiply a vector faster than a conv and a transposed conv do (one core:
# 25 us against 100 us for 46k entries, 700 us against 320 us for 1.7M)
BAND_PRODUCT_MAX = 1 << 18

def gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


@dataclass(frozen=True)
class ProvenSolve:
    """A least-squares solution ``x`` (natural order, float64), a proven lower bound ``sigma`` on
    ``sigma_min(J)``, an estimate ``lam`` of ``lambda_min(J^T J)`` (the hint for the next system), and whether
    ``sigma`` was proven in float64 (:func:`proven_sigma64`'s proof: float32's rounding was too coarse)."""

    x: np.ndarray
    sigma: float
    lam: float
    float64: bool = False


def factor_slack(cb: np.ndarray) -> float:
    """A bound on ``||E||_2`` for the band Cholesky factor ``cb`` (lower band storage, float32 or float64):
    ``gamma_{b+2}`` (in ``cb``'s precision, ``b = rows - 1`` the half-bandwidth) times the largest entry of
    ``|L| (|L^T| 1)``, two triangular band products of non-negative numbers (BLAS ``tbmv``, which never reads the
    unused corner of band storage; their rounding is covered by ``SUM_MARGIN``)."""
    rows, n = cb.shape
    a = np.abs(cb, out=work_array("band factor, absolute", cb.shape, cb.dtype, order="F"))
    tbmv = sl.get_blas_funcs("tbmv", (a,))
    col = tbmv(rows - 1, a, np.ones(n, dtype=a.dtype), lower=1, trans=1)  # |L^T| 1
    row = tbmv(rows - 1, a, col, lower=1, overwrite_x=1)  # |L| (|L^T| 1)
    u = float(np.finfo(cb.dtype).eps) / 2
    return gamma(rows + 1, u) * float(row.max()) * SUM_MARGIN


def factor(ab: np.ndarray, tau: float, dtype=np.float32, bound: bool = True) -> tuple[np.ndarray, float] | None:
    """The band Cholesky factor of ``N - tau I`` in ``dtype`` (``ab``: lower band storage of ``N``, float64,
    best Fortran-ordered as :meth:`~fedleak.nets.conv_gram.ConvGram.band` gives it: LAPACK then factors it in
    place) and a bound on ``||D||_2 + ||E||_2`` (rounding to ``dtype`` and factorisation error; ``inf`` without
    ``bound``: a preconditioner only), or None when the factorisation fails. Inside
    :func:`fedleak.nets.scratch.reused_arrays` the factor is overwritten by the next call for the same shape and
    ``dtype``."""
    a = work_array("band factor", ab.shape, dtype, order="F")
    np.copyto(a, ab)
    if tau:
        a[0] = (ab[0] - tau).astype(dtype)
    cb, info = sl.get_lapack_funcs("pbtrf", (a,))(a, lower=1, overwrite_ab=1)
    if info != 0:  # not positive definite
        return None
    if not bound:
        return cb, math.inf
    err = 0.0
    if a.dtype != ab.dtype:  # ||D|| <= u ||N - tau I||_F <= u (||N||_F + tau sqrt(n)) (the diagonal counted twice)
        flat = ab.ravel(order="K")
        err = float(np.finfo(dtype).eps) / 2 * (math.sqrt(2 * float(flat @ flat)) + tau * math.sqrt(ab.shape[1])) \
            * SUM_MARGIN
    return cb, err + factor_slack(cb)


def band_solver(cb: np.ndarray, order: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> (L L^T)^{-1} v`` in natural order, in float32 arithmetic (a preconditioner)."""
    pbtrs = sl.get_lapack_funcs("pbtrs", (cb,))

    def solve(v: np.ndarray) -> np.ndarray:
        out = np.empty(len(v))
        y, info = pbtrs(cb, v[order].astype(np.float32), lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"pbtrs failed (info {info})")
        out[order] = y
        return out

    return solve


def lanczos_max(solve: Callable[[np.ndarray], np.ndarray], n: int, steps: int = LANCZOS_STEPS) -> float:
    """The largest Ritz value of the symmetric operator ``solve`` after a few Lanczos steps."""
    v = np.random.default_rng(0).standard_normal(n)
    v /= np.linalg.norm(v)
    prev = np.zeros(n)
    alphas, betas = [], []
    beta = 0.0
    for _ in range(steps):
        w = solve(v) - beta * prev
        alpha = float(v @ w)
        w -= alpha * v
        alphas.append(alpha)
        beta = float(np.linalg.norm(w))
        if beta <= 1e-12 * abs(alpha):
            break
        betas.append(beta)
        prev, v = v, w / beta
    return float(sl.eigvalsh_tridiagonal(np.array(alphas), np.array(betas[: len(alphas) - 1]))[-1])


@dataclass(frozen=True)
class CGResult:
    """The solution of a conjugate-gradient run and the largest Lanczos value of the preconditioned operator
    (from the run's step lengths ``alpha`` and direction updates ``beta``)."""

    x: np.ndarray
    alphas: tuple[float, ...]
    betas: tuple[float, ...]

    def ritz_max(self) -> float:
        a, b = self.alphas, self.betas
        k = len(a)
        if k == 0:
            return 1.0
        diag = np.array([1 / a[j] + (b[j - 1] / a[j - 1] if j else 0.0) for j in range(k)])
        off = np.array([math.sqrt(b[j]) / a[j] for j in range(k - 1)])
        return float(sl.eigvalsh_tridiagonal(diag, off)[-1]) if k > 1 else float(diag[0])


def pcg(matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray,
        precond: Callable[[np.ndarray], np.ndarray]) -> CGResult | None:
    """Preconditioned conjugate gradients for ``N x = b`` from zero; None when it does not converge."""
    x = np.zeros_like(b)
    r = b.copy()
    z = precond(r)
    p = z.copy()
    rz = rz0 = float(r @ z)
    alphas, betas = [], []
    for _ in range(CG_MAX):
        if rz <= CG_TOL ** 2 * rz0:
            return CGResult(x, tuple(alphas), tuple(betas))
        q = matvec(p)
        pq = float(p @ q)
        if not pq > 0:
            return None
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        z = precond(r)
        rz_new = float(r @ z)
        alphas.append(alpha)
        betas.append(rz_new / rz)
        p = z + betas[-1] * p
        rz = rz_new
    return CGResult(x, tuple(alphas), tuple(betas)) if rz <= CG_TOL ** 2 * rz0 else None


def conv_normal_product(weight: torch.Tensor, in_shape: tuple[int, int, int], geometry: ConvGeometry,
                        w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> A^T diag(w) A v`` by a conv and a transposed conv (``weight``: the folded kernel, float64, CPU)."""
    shape = (1, *in_shape)
    wt = torch.from_numpy(w)

    def apply(v: np.ndarray) -> np.ndarray:
        z = geometry.conv(torch.from_numpy(v).reshape(shape), weight)
        z = z * wt.reshape(z.shape)
        return geometry.transposed(shape, weight, z).reshape(-1).numpy()

    return apply


def band_product(ab: np.ndarray, order: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> N v`` from ``N``'s lower band storage ``ab`` (float64, pixel-major order ``order``; BLAS ``sbmv``), in
    natural order."""
    sbmv = sl.get_blas_funcs("sbmv", (ab,))
    k = ab.shape[0] - 1

    def apply(v: np.ndarray) -> np.ndarray:
        out = np.empty(len(v))
        out[order] = sbmv(k, 1.0, ab, v[order], lower=1)
        return out

    return apply


def normal_product(ab: np.ndarray, order: np.ndarray, weight: torch.Tensor, in_shape: tuple[int, int, int],
                   geometry: ConvGeometry, w: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``v -> N v``, ``N = A^T diag(w) A`` (``ab`` its band, the other arguments those of
    :func:`conv_normal_product`): by the band for a small band (a conv call costs more than the whole product),
    else by a conv and a transposed conv."""
    if ab.size <= BAND_PRODUCT_MAX:
        return band_product(ab, order)
    return conv_normal_product(weight, in_shape, geometry, w)


def proof(ab: np.ndarray, tau: float, forming: float, dtype=np.float32) -> tuple[np.ndarray, float] | None:
    """The factor of ``N - tau I`` in ``dtype`` and the proven ``sigma = sqrt(tau - slack)``; None when the
    factorisation fails or the rounding slack is too large a part of ``tau``."""
    got = factor(ab, tau, dtype)
    if got is None:
        return None
    sigma = proven_sigma(ab, tau, forming, got[1])
    return None if sigma is None else (got[0], sigma)


def proven_sigma(ab: np.ndarray, tau: float, forming: float, err: float) -> float | None:
    """``sqrt(tau - slack)`` for a factorisation of ``N - tau I`` whose rounding (to its dtype, and its backward
    error) is bounded by ``err``; None when the slack is too large a part of ``tau``."""
    slack = forming + err + EPS64 * (float(np.abs(ab[0]).max()) + tau)
    return None if slack > MAX_SLACK * tau else math.sqrt(tau - slack)


def proven_lstsq(ab: np.ndarray, order: np.ndarray, max_terms: int, matvec: Callable[[np.ndarray], np.ndarray],
                 b: np.ndarray, hint: float | None = None) -> ProvenSolve | None:
    """Solve ``N x = b`` (``b = J^T rhs``) with a proven ``sigma_min(J) >= sigma`` from a float32 factorisation of
    ``N - tau I``, or from a float64 one where float32's rounding is too coarse for the proof; None when neither
    gives it (the caller then solves in float64 throughout).

    ``ab``: ``N`` in lower band storage of the pixel-major order ``order``; ``matvec``: ``v -> N v`` in float64;
    ``hint``: an estimate of ``lambda_min(N)`` (from the previous system of the block), or None."""
    with blas_threads(1):  # band factorisations are too small to gain from threads
        return solve_with_hint(ab, order, max_terms, matvec, b, hint)


def plain_lstsq(ab: np.ndarray, order: np.ndarray, matvec: Callable[[np.ndarray], np.ndarray], b: np.ndarray
                ) -> np.ndarray | None:
    """Solve ``N x = b`` (the arguments of :func:`proven_lstsq`) without a proof of ``sigma_min``, for a sample
    nothing can certify: conjugate gradients preconditioned by a float32 factor of ``N`` itself (two or three
    iterations, where the proof's shifted factor needs about a dozen), to the same tolerance. None where that
    factorisation or the iteration fails (the caller then solves in float64)."""
    with blas_threads(1):  # band factorisations are too small to gain from threads
        got = factor(ab, 0.0, bound=False)
        cg = None if got is None else pcg(matvec, b, band_solver(got[0], order))
    return None if cg is None else cg.x


def forming_error(ab: np.ndarray, max_terms: int) -> float:
    """A bound on ``||F||_2``, the error of forming ``N`` in float64: ``gamma_{k+2} ||J||_F^2``, ``||J||_F^2 =
    trace(N)``."""
    return gamma(max_terms + 2, EPS64) * float(ab[0].sum()) * SUM_MARGIN


def proven_sigma64(ab: np.ndarray, max_terms: int, lam: float) -> float | None:
    """A tighter proven lower bound on ``sigma_min(J)`` than float32 gives, from one float64 factorisation of
    ``N - tau I`` for ``tau`` a fraction of ``lam`` (an estimate of ``lambda_min(N)``, e.g. a solve's
    :attr:`ProvenSolve.lam`); None when neither shift gives the proof. ``lam`` only picks ``tau``."""
    with blas_threads(1):  # band factorisations are too small to gain from threads
        return sigma64(ab, lam, forming_error(ab, max_terms))


def sigma64(ab: np.ndarray, lam: float, forming: float) -> float | None:
    """:func:`proven_sigma64` with ``||F||`` bounded already (``forming``)."""
    if not (math.isfinite(lam) and lam > 0):
        return None
    for frac in (SHIFT, RETRY_SHIFT):
        got = proof(ab, frac * lam, forming, np.float64)
        if got is not None:
            return got[1]
    return None


def prove_solved(x: np.ndarray, ab: np.ndarray, lam: float, forming: float, err32: float) -> ProvenSolve | None:
    """The solve ``x`` of a system whose ``lambda_min`` is estimated as ``lam``, proven by a float32 factorisation
    of ``N - tau I`` at the shifts where float32's slack may allow it (``err32``: the slack of a float32 factor of
    this ``N`` made already; a shifted factor's is about the same), else by a float64 one (:func:`sigma64`: an
    ill-conditioned system, float32's rounding too coarse for the proof); None when neither gives it."""
    for frac in (SHIFT, RETRY_SHIFT):
        if err32 <= 2 * MAX_SLACK * frac * lam:
            got = proof(ab, frac * lam, forming)
            if got is not None:
                return ProvenSolve(x, got[1], lam)
    sigma = sigma64(ab, lam, forming)
    return None if sigma is None else ProvenSolve(x, sigma, lam, float64=True)


def solve_with_hint(ab: np.ndarray, order: np.ndarray, max_terms: int, matvec: Callable[[np.ndarray], np.ndarray],
                    b: np.ndarray, hint: float | None) -> ProvenSolve | None:
    forming = forming_error(ab, max_terms)
    if hint is not None and math.isfinite(hint) and hint > 0:
        tau = SHIFT * hint
        got = factor(ab, tau)
        cg = None if got is None else pcg(matvec, b, band_solver(got[0], order))
        if cg is not None:
            mu = cg.ritz_max()  # ~ lambda_min / (lambda_min - tau), the preconditioned operator's largest value
            lam = tau * mu / (mu - 1) if mu > 1 + 1e-6 else hint
            sigma = proven_sigma(ab, tau, forming, got[1])
            fast = ProvenSolve(cg.x, sigma, lam) if sigma is not None else (
                prove_solved(cg.x, ab, lam, forming, got[1]) if mu >= INFORMATIVE else None)
            if fast is not None:
                return fast
    base = factor(ab, 0.0)  # no hint, or it was above this system's lambda_min or far below: estimate this one's
    if base is None:
        return None
    precond = band_solver(base[0], order)
    cg = pcg(matvec, b, precond)  # a float32 factor of N itself: two or three iterations
    if cg is None:
        return None
    lam = 1.0 / lanczos_max(precond, ab.shape[1])
    return prove_solved(cg.x, ab, lam, forming, base[1])
