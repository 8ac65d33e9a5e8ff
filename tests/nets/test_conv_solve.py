"""Least squares with a proven sigma_min from one float32 band factorisation (fedleak.nets.conv_solve), on the real
systems of conv layers: the bound must never exceed the true smallest singular value (checked against an SVD),
the solution must be the float64 least-squares one, the float32 slack must bound the factorisation's real error,
a hint above the system's lambda_min must not make the proof fail, and a rank-deficient system must not be
proven; the float64 re-proof is tighter and still below the truth, and proves what float32 cannot. The conv
block's caches must follow the model's weights."""

import numpy as np
import pytest
import torch

import fedleak
from fedleak.attacks.normal_equations import normal_equations
from fedleak.models.convnet import make_convnet
from fedleak.nets import as_network
from fedleak.nets.cast import cast
from fedleak.nets.conv_solve import (
    SHIFT,
    conv_normal_product,
    factor,
    factor_slack,
    forming_error,
    plain_lstsq,
    proof,
    proven_lstsq,
    proven_sigma64,
)


@pytest.fixture(scope="module")
def faces():
    return fedleak.load_dataset("lfw").batch(8, seed=0)[0], as_network(
        make_convnet((1, 25, 25), 2, channels=(6,), padding=1, fc_widths=(8,), seed=0)).blocks[0]


def _system(faces, k: int, keep: float | None = None):
    X, blk = faces
    x = X[k]
    A, c = blk.affine
    z = A @ x.reshape(-1).double().numpy() + c
    rows = np.flatnonzero(z > 0)
    if keep is not None:
        rows = rows[: int(keep * A.shape[1])]
    w = np.zeros(A.shape[0])
    w[rows] = 1.0
    matvec = conv_normal_product(blk.folded()[0].cpu(), blk.in_shape, blk.conv.geometry, w)
    return blk, A[rows], z[rows] - c[rows], w, matvec, x.reshape(-1).double().numpy()


def _sigma_min(J) -> float:
    return float(np.sqrt(np.linalg.eigvalsh((J.T @ J).toarray())[0]))  # well conditioned: no SVD needed


@pytest.mark.parametrize("k", [4, 7])
def test_bound_is_below_the_true_sigma_and_the_solution_is_least_squares(faces, k):
    blk, J, rhs, w, matvec, x_true = _system(faces, k)
    ab = blk.gram.band(w)
    got = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs)
    assert got is not None
    true_sigma = _sigma_min(J)
    assert 0.5 * true_sigma < got.sigma <= true_sigma
    assert np.abs(got.x - x_true).max() < 1e-7
    ref = normal_equations(J, blk.gram.order, ab, blk.gram.max_terms)
    assert np.abs(got.x - ref.lstsq(rhs)).max() < 1e-7
    assert got.lam >= true_sigma ** 2  # the estimate approaches lambda_min from above


@pytest.mark.parametrize("k", [4, 7])
def test_plain_solve_is_the_proven_solve_without_its_proof(faces, k):
    blk, J, rhs, w, matvec, x_true = _system(faces, k)
    ab = blk.gram.band(w)
    proven = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs)
    plain = plain_lstsq(ab, blk.gram.order, matvec, J.T @ rhs)
    assert proven is not None and plain is not None
    assert np.abs(plain - x_true).max() < 1e-7
    assert np.abs(plain - proven.x).max() < 1e-8
    singular = ab.copy()
    singular[0] = -1.0  # not positive definite: no float32 factor, no solve
    assert plain_lstsq(singular, blk.gram.order, matvec, J.T @ rhs) is None


def test_a_hint_never_weakens_the_proof(faces):
    blk, J, rhs, w, matvec, _ = _system(faces, 4)
    ab = blk.gram.band(w)
    true_sigma = _sigma_min(J)
    for hint in (true_sigma ** 2 * 0.9, true_sigma ** 2 * 5.0, true_sigma ** 2 * 1e3):  # below, above, far above
        got = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs, hint)
        assert got is not None and 0.0 < got.sigma <= true_sigma


def test_float32_slack_bounds_the_real_factorisation_error(faces):
    blk, J, rhs, w, _, _ = _system(faces, 7)
    ab = blk.gram.band(w)
    n, b = ab.shape[1], ab.shape[0] - 1
    N = np.zeros((n, n))
    for d in range(b + 1):
        N[np.arange(d, n), np.arange(n - d)] = ab[d, : n - d]
        N[np.arange(n - d), np.arange(d, n)] = ab[d, : n - d]
    tau = 0.3 * float(np.linalg.eigvalsh(N)[0])
    for dtype, most in ((np.float32, 1e-3), (np.float64, 1e-10)):
        cb, slack = factor(ab, tau, dtype)
        assert cb.dtype == dtype
        L = np.zeros((n, n))
        for d in range(b + 1):
            L[np.arange(d, n), np.arange(n - d)] = cb[d, : n - d]
        err = np.linalg.norm(L @ L.T - (N - tau * np.eye(n)), 2)
        assert err <= slack < most * tau


def test_factor_slack_reads_the_band_not_its_unused_corner():
    """The bound is gamma_{b+2} times the largest row sum of |L| |L^T|, whatever LAPACK left in the corner."""
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        cb = np.asfortranarray(rng.standard_normal((4, 9)).astype(dtype))
        L = np.zeros((9, 9))
        for d in range(4):
            L[np.arange(d, 9), np.arange(9 - d)] = cb[d, : 9 - d]
        cb[3, 8] = cb[2, 8] = 1e6  # past the matrix: never read
        u = float(np.finfo(dtype).eps) / 2
        expected = 5 * u / (1 - 5 * u) * float((np.abs(L) @ np.abs(L.T)).sum(1).max())
        assert expected <= factor_slack(cb) <= 1.02 * expected


@pytest.mark.parametrize("k", [4, 7])
def test_float64_reproof_is_tighter_and_still_a_bound(faces, k):
    blk, J, rhs, w, matvec, _ = _system(faces, k)
    ab = blk.gram.band(w)
    fast = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs)
    tight = proven_sigma64(ab, blk.gram.max_terms, fast.lam)
    assert tight is not None and fast.sigma < tight <= _sigma_min(J)
    assert proven_sigma64(ab, blk.gram.max_terms, float("nan")) is None


@pytest.mark.parametrize("k, keep", [(4, 1.05), (7, 1.2)])
def test_float32_too_coarse_is_proven_in_float64(faces, k, keep):
    """Barely overdetermined systems (condition 200-7,000): float32's rounding slack exceeds what the proof
    allows, so the float32 solve is kept and sigma proven by one float64 factorisation, still below the truth,
    with or without a hint."""
    blk, J, rhs, w, matvec, _ = _system(faces, k, keep)
    ab = blk.gram.band(w)
    true_sigma = _sigma_min(J)
    got = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs)
    assert got is not None and got.float64
    assert proof(ab, SHIFT * got.lam, forming_error(ab, blk.gram.max_terms)) is None  # float32 cannot prove it
    assert 0.0 < got.sigma <= true_sigma
    ref = normal_equations(J, blk.gram.order, ab, blk.gram.max_terms).lstsq(rhs)
    assert np.linalg.norm(J @ got.x - rhs) <= np.linalg.norm(J @ ref - rhs) + 1e-9 * np.linalg.norm(rhs)
    hinted = proven_lstsq(ab, blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs, got.lam)
    assert hinted is not None and hinted.float64 and 0.0 < hinted.sigma <= true_sigma


def test_rank_deficient_system_is_not_proven(faces):
    blk, J, rhs, w, matvec, _ = _system(faces, 4, keep=0.5)  # fewer equations than unknowns
    got = proven_lstsq(blk.gram.band(w), blk.gram.order, blk.gram.max_terms, matvec, J.T @ rhs)
    assert got is None


def test_conv_caches_follow_the_weights():
    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), seed=0)
    blk = as_network(model).blocks[0]
    A1 = blk.affine[0].toarray()
    assert as_network(model).blocks[0].affine[0] is blk.affine[0]  # read again: reused
    with torch.no_grad():
        model[0].weight.data.mul_(2.0)  # through .data: torch's version counter does not move
    np.testing.assert_allclose(as_network(model).blocks[0].affine[0].toarray(), 2 * A1, rtol=1e-12)
    w = model[-1].weight
    w64 = cast(w, torch.float64)
    assert cast(w, torch.float64) is w64  # one copy while it is held
    with torch.no_grad():
        w.data.add_(1.0)
    assert torch.equal(cast(w, torch.float64), w.detach().double())


def test_band_product_equals_the_conv_product_and_is_picked_for_small_bands(faces, monkeypatch):
    """``normal_product`` multiplies by ``N`` through its band when the band is small and through convs otherwise;
    both are ``A^T diag(w) A v``."""
    from fedleak.nets import conv_solve

    blk, J, _, w, matvec, _ = _system(faces, 4)
    ab = blk.gram.band(w)
    v = np.random.default_rng(0).standard_normal(blk.in_dim)
    want = J.T @ (J @ v)
    for prod in (conv_solve.band_product(ab, blk.gram.order), matvec):
        np.testing.assert_allclose(prod(v), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    args = (ab, blk.gram.order, blk.folded()[0].cpu(), blk.in_shape, blk.conv.geometry, w)
    assert ab.size <= conv_solve.BAND_PRODUCT_MAX  # 625 unknowns, half-bandwidth 52
    assert conv_solve.normal_product(*args).__qualname__.startswith("band_product")
    monkeypatch.setattr(conv_solve, "BAND_PRODUCT_MAX", ab.size - 1)
    assert conv_solve.normal_product(*args).__qualname__.startswith("conv_normal_product")
