"""The span of a set of rows: an orthonormal basis from a Gaussian sketch, and the rows' coordinates on it.

Every implied input of the last ReLU layer lies in the span of the batch's ``M`` inputs to that layer, up to the
update's rounding, however many rows and groups there are: a few hundred rows of a thousand entries are, to
within that rounding, points of an ``M``-dimensional space. A basis of it lets the candidate check's screen
(:mod:`fedleak.attacks.exact.span_screen`) bound a forward pass from one product of the basis's width, and the
grouping shortlist the pairs of rows that may lie within a tolerance from their coordinates (:func:`near_in_span`)
rather than from a Gram matrix of the whole rows. Neither needs the basis to be right: the bounds read the
remainder each row leaves off it.

The rows are read through a :data:`Pieces` callable, a piece of rows at a time (a set of rows gathered from a
layer's gradient is never held whole), or from a tensor held already (:func:`whole`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fedleak.nets.float64 import matmul64

F64 = torch.float64
EPS64 = float(torch.finfo(F64).eps)
SIGNAL = 1e-5  # basis directions: singular values of X above this fraction of the largest (rounding: ~1e-7)
BASIS_SEED = 20_261_202
KAPPA = 4  # the coordinates' squared norms are lowered by KAPPA (r + 8) eps: twice the product's rounding bound
BLOCK = 128  # rows of the pairwise arrays formed at once

Pieces = Callable[[], Iterable[tuple[int, torch.Tensor]]]
"""``(start, rows start:start + len(rows))`` over a set of rows, in float64, in order (called once per read)."""


def whole(X: torch.Tensor) -> Pieces:
    """The rows of ``X`` (float64), as one piece."""
    return lambda: ((0, X),)


def in_pieces(X: torch.Tensor, rows: int) -> Pieces:
    """The rows of ``X`` (float64), ``rows`` at a time (a product with them then needs no temporary of X's size)."""
    return lambda: ((s, X[s : s + rows]) for s in range(0, len(X), rows))


def span_basis(pieces: Pieces, n: int, max_rank: int, seed: int = BASIS_SEED) -> torch.Tensor | None:
    """An orthonormal basis (``d x r``, float64) of the directions of the ``n`` rows ``X`` whose singular values
    exceed ``SIGNAL`` times the largest, from a Gaussian sketch ``Omega X`` of ``k`` rows (``k`` doubled from 32
    while the sketch is of full rank, up to ``max_rank + 1``); None where ``X`` is zero, its rank exceeds
    ``max_rank`` or the sketch's Gram matrix overflows."""
    gen = torch.Generator().manual_seed(seed)
    k = min(32, n, max_rank + 1)  # a sketch of max_rank + 1 rows can show that the rank is at most max_rank
    while k >= 1:
        Y = torch.cat([rows for _, rows in pieces()]) if k == n else sketch(pieces, torch.randn(k, n, generator=gen,
                                                                                                  dtype=F64))
        gram = Y @ Y.T
        if not bool(torch.isfinite(gram).all()):
            return None
        try:
            lam, V = torch.linalg.eigh(gram)
        except torch.linalg.LinAlgError:
            return None
        top = float(lam[-1])
        if not top > 0:
            return None
        r = int((lam > SIGNAL**2 * top).sum())
        if r > max_rank:
            return None
        if r < k or k == n:
            Q, _ = torch.linalg.qr((V[:, -r:].T @ Y).T)
            return Q
        k = min(2 * k, n, max_rank + 1)
    return None


def sketch(pieces: Pieces, omega: torch.Tensor) -> torch.Tensor:
    """``omega @ X`` (``omega``: ``k x n``, CPU), summed over the pieces of ``X``."""
    out = None
    for start, rows in pieces():
        part = omega[:, start : start + len(rows)].to(rows.device) @ rows
        out = part if out is None else out.add_(part)
    return out


@dataclass(frozen=True)
class SpanCoordinates:
    """Rows ``x_k`` written as ``Q c_k + e_k``: the coordinates ``C`` (one row each) on a basis ``Q``, upper
    bounds ``rho`` of the remainders' norms ``||e_k||`` (the float64 rounding of computing them included), and
    ``shrink``, a lower bound of ``Q``'s smallest singular value, so that
    ``||x_a - x_b|| >= shrink ||c_a - c_b|| - rho_a - rho_b``; ``dim``: the rows' length."""

    Q: torch.Tensor
    C: torch.Tensor
    rho: torch.Tensor
    shrink: float
    dim: int


def span_coordinates(pieces: Pieces, n: int, d: int, max_rank: int) -> SpanCoordinates | None:
    """The rows' :class:`SpanCoordinates` on their :func:`span_basis` (None where it finds none)."""
    Q = span_basis(pieces, n, max_rank)
    if Q is None:
        return None
    r = Q.shape[1]
    # ||Q^T Q - I||_2 <= its Frobenius norm, whose computed value is off by at most r (d + 2) eps
    off = float(torch.linalg.matrix_norm(Q.T @ Q - torch.eye(r, dtype=F64, device=Q.device))) + r * (d + 2) * EPS64
    C = torch.empty(n, r, dtype=F64, device=Q.device)
    rho = torch.empty(n, dtype=F64, device=Q.device)
    for start, rows in pieces():
        c = matmul64(rows, Q, C[start : start + len(rows)])
        e = torch.linalg.vector_norm(torch.addmm(rows, c, Q.T, alpha=-1), dim=1)
        # each computed entry of x - Q c is off by at most (r + 2) eps (|x| + |Q| |c|) entrywise
        size = torch.linalg.vector_norm(rows, dim=1) + math.sqrt(r) * (1 + off) * torch.linalg.vector_norm(c, dim=1)
        rho[start : start + len(rows)] = e * (1 + (d + 2) * EPS64) + 2 * (r + 2) * EPS64 * size
    return SpanCoordinates(Q, C, rho, max(0.0, 1.0 - off), d)


def near_in_span(coords: SpanCoordinates, norms: torch.Tensor, tol: float, sel: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """A superset of the pairs of rows (of ``sel``, all by default; ``norms``: their norms, as the exact test
    reads them) within ``tol`` times the larger norm of each other, as an exact float64 distance measures it: the
    coordinates' distance, less the remainders, bounds the rows' from below (:class:`SpanCoordinates`).

    The squared distances of the coordinates come from one product, ``[C, s, 1] [-2 C, 1, s]^T`` with ``s`` the
    squared norms lowered by ``KAPPA (r + 8) eps`` (relative), which covers the product's rounding: each value is
    at most the exact one. Taken ``BLOCK`` rows at a time (the pairwise arrays stay in cache)."""
    C, rho = (coords.C, coords.rho) if sel is None else (coords.C[sel], coords.rho[sel])
    n, r = C.shape
    low = C.square().sum(1) * (1 - KAPPA * (r + 8) * EPS64)
    ones = torch.ones(n, 1, dtype=F64, device=C.device)
    left = torch.cat([C, low[:, None], ones], 1)
    right = torch.cat([-2 * C, ones, low[:, None]], 1).T.contiguous()
    # the exact test's own rounding: a computed distance may read up to (dim + 4) eps (relative) below the true one
    grow = tol * (1 + 4 * (coords.dim + 4) * EPS64)
    scale = coords.shrink**2 / (1 + 16 * EPS64)
    out = torch.empty(n, n, dtype=torch.bool, device=C.device)
    for s in range(0, n, BLOCK):
        d2 = matmul64(left[s : s + BLOCK], right).clamp_min_(0).mul_(scale)
        reach = torch.maximum(norms[s : s + BLOCK, None], norms[None, :]).mul_(grow)
        reach.add_(rho[s : s + BLOCK, None]).add_(rho[None, :])
        torch.le(d2, reach.mul_(reach), out=out[s : s + BLOCK])
    return out
