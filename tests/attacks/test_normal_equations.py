"""Least squares with a proven lower bound on sigma_min (fedleak.attacks.normal_equations), on the real
systems of a conv layer: a face's active units. The bound must never exceed the true smallest singular
value, both factorisations must agree, and a rank-deficient system must not be proven."""

import numpy as np
import pytest

import fedleak
from fedleak.attacks.normal_equations import BandedNormal, SparseNormal, normal_equations
from fedleak.models.convnet import make_convnet
from fedleak.nets import as_network


@pytest.fixture(scope="module")
def system():
    x, _ = fedleak.load_dataset("lfw").batch(1, seed=4)
    net = as_network(make_convnet((1, 25, 25), 2, channels=(6,), padding=1, fc_widths=(8,), seed=0))
    blk = net.blocks[0]
    A, c = blk.affine
    z = A @ x.reshape(-1).double().numpy() + c
    rows = np.flatnonzero(z > 0)
    return blk, A, rows, z[rows] - c[rows], x.reshape(-1).double().numpy()


def test_banded_and_sparse_solves_agree_and_bound_is_below_the_truth(system):
    blk, A, rows, rhs, x_true = system
    J = A[rows]
    w = np.zeros(A.shape[0])
    w[rows] = 1
    banded = normal_equations(J, blk.gram.order, blk.gram.band(w), blk.gram.max_terms)
    sparse = SparseNormal(J)
    assert isinstance(banded, BandedNormal)
    xb, xs = banded.lstsq(rhs), sparse.lstsq(rhs)
    assert np.abs(xb - x_true).max() < 1e-10 and np.abs(xs - x_true).max() < 1e-10
    true_sigma = float(np.linalg.svd(J.toarray(), compute_uv=False).min())
    for s in (banded.sigma_lower(), sparse.sigma_lower()):
        assert 0.05 * true_sigma < s <= true_sigma


def test_normal_equations_forms_the_band_itself(system):
    blk, A, rows, rhs, x_true = system
    solver = normal_equations(A[rows], blk.gram.order)
    assert isinstance(solver, BandedNormal)
    assert np.abs(solver.lstsq(rhs) - x_true).max() < 1e-10


def test_rank_deficient_system_is_not_proven(system):
    blk, A, rows, rhs, _ = system
    J = A[rows[: A.shape[1] // 2]]  # fewer equations than unknowns
    for solver in (normal_equations(J, blk.gram.order), SparseNormal(J)):
        x = solver.lstsq(rhs[: J.shape[0]])
        assert x is None or solver.sigma_lower() < 1e-6
