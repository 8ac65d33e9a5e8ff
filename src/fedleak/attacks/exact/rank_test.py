"""The joint rank test of the certificate (step 5): subtracting the true samples' rank-one terms from a layer's
gradient leaves at most ``M - |set|`` directions, so a set whose residual has energy beyond that rank holds a
sample that is not the batch's (docs/attacks.md, "The certificate", check 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets import Trace
from fedleak.nets.float64 import PIECE_ENTRIES, back64, matmul64, pieces64

F64 = torch.float64


SKETCH_CACHE_BYTES = 32 * 2**20  # drawn sketch columns kept for the next call (all layers together)
BLOCK = 16  # sketch columns drawn from one generator


def gaussian_sketches(seed: int, rows: tuple[int, ...], k: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    """Gaussian matrices ``rows[j] x k`` (CPU, read only, transposed views) in ``dtype``, drawn in float32 (a
    float64 sketch holds the same numbers): matrix ``j``'s columns are drawn ``BLOCK`` at a time, block ``b``
    from a generator of its own seeded by ``(seed, j, b)``, so the matrix of ``k`` columns is the first ``k``
    columns of any wider one of the same seed. Peeling's rounds ask for fewer columns round after round: the
    columns drawn are kept (:class:`SketchColumns`) and read again."""
    return tuple(SKETCH_COLUMNS.take(seed, j, n, k, dtype).T for j, n in enumerate(rows))


def column_block(seed: int, j: int, b: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Block ``b`` of matrix ``j``: ``BLOCK`` Gaussian columns of length ``n`` (as rows), from their own seed,
    drawn in float32 (torch draws them 6x faster than float64's) and held in ``dtype``."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + j) * 1_000_003 + b) % 2**63)
    return torch.randn(BLOCK, n, generator=gen, dtype=torch.float32).to(dtype)


class SketchColumns:
    """The sketch columns drawn so far, per ``(seed, matrix, rows, dtype)``: a ``K x rows`` tensor (one row per
    column), grown by whole blocks; the least recently used are dropped beyond ``SKETCH_CACHE_BYTES`` in all."""

    def __init__(self, budget: int):
        self.budget = budget
        self.drawn: dict[tuple, torch.Tensor] = {}

    def take(self, seed: int, j: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``k`` columns of matrix ``j`` as rows (``k x n``)."""
        key = (seed, j, n, dtype)
        have = self.drawn.pop(key, torch.empty(0, n, dtype=dtype))
        if len(have) < k:
            more = [column_block(seed, j, b, n, dtype) for b in range(len(have) // BLOCK, -(-k // BLOCK))]
            have = torch.cat([have, *more])
        self.drawn[key] = have  # the most recently used last
        while sum(t.nbytes for t in self.drawn.values()) > self.budget and self.drawn:
            del self.drawn[next(iter(self.drawn))]
        return have[:k]


SKETCH_COLUMNS = SketchColumns(SKETCH_CACHE_BYTES)


def sketch_dtype(G: torch.Tensor) -> torch.dtype:
    """The dtype a layer's gradient ``G`` is sketched in: float32 for a float32 gradient on the CPU (numpy's BLAS
    takes the product at twice float64's speed, in plain IEEE float32 arithmetic), else float64."""
    return torch.float32 if G.dtype == torch.float32 and G.device.type == "cpu" else F64


@dataclass(frozen=True)
class JointLayer:
    """One layer of the joint test: its observed gradient ``O = [G | g]`` as the client sent it (never copied
    whole), every candidate's backward signal ``U`` and input ``A`` (one row each; ``A`` ends with a 1 where the
    layer has a bias), the Frobenius norm ``noise`` of the update's own rounding noise on ``O`` (0 where the
    update carries none beyond the gradient's), and ``small``, ``O``'s smaller side."""

    index: int
    G: torch.Tensor
    g: torch.Tensor | None
    U: torch.Tensor
    A: torch.Tensor
    noise: float
    small: int

    def exact_residual(self, terms: torch.Tensor, inputs: torch.Tensor) -> float:
        """``||O - terms @ inputs||_F``, formed a piece of ``O``'s rows at a time (in the converted piece itself,
        which is read no more, where ``O`` is not float64)."""
        sq = 0.0
        d_in = self.G.shape[1]
        converted = self.G.dtype != F64
        for s, piece in pieces64(self.G, terms.shape[1]):
            rows = terms[s : s + len(piece)]
            diff = (piece.addmm_(rows, inputs[:, :d_in], alpha=-1) if converted else
                    torch.addmm(piece, rows, inputs[:, :d_in], alpha=-1))
            sq += float(torch.linalg.vector_norm(diff)) ** 2
        if self.g is not None:
            sq += float(torch.linalg.vector_norm(self.g.to(F64) - terms @ inputs[:, d_in])) ** 2
        return math.sqrt(sq)


class JointTest:
    """Whether a set of rebuilt samples, each at its scale, explains every layer's observed gradient jointly.

    The statistic is the energy of the residual ``O - sum_set s_k delta_k [a_k, 1]`` beyond rank ``r = M - |set|``
    (``sqrt`` of the sum of its squared singular values past the ``r``-th), over a threshold ``batch_tol * ||O|| +
    3 ||noise||``; ``excess <= 1`` passes.

    A set of the whole batch (``r = 0``) of at most ``k / 2`` samples is tested exactly: the residual's norm, one
    pass over the layer, which costs less than the ``k``-column sketch below (on a wide layer the product of many
    samples' terms, a piece at a time, costs more). Otherwise each layer (hidden layers and the output layer)
    keeps a Gaussian sketch of the observed gradient and of each candidate's rank-one term, on the layer's longer
    side: ``O @ Omega`` (``d_out x k``), or ``Omega^T @ O`` (``k x (d_in + 1)``) for a layer with more outputs than
    inputs, taken when the first such set is tested. Testing a set then costs one product of the set's terms per
    layer and the Gram matrix of a ``k``-wide residual, and the norms in the threshold are the sketches' (the
    noise's times ``sqrt(k)``). Layers whose smaller side is at most ``k`` are tested exactly, without a sketch.
    A float32 gradient on the CPU is sketched in float32 (:func:`sketch_dtype`); the Gaussian matrix is drawn in
    float32 (:func:`gaussian_sketches`), and the terms are sketched by the same matrix in float64. The product's
    rounding is noise in the residual: at most 3e-3 of the threshold on the batches measured (docs/attacks.md,
    check 5).
    """

    def __init__(self, attack, t64: Trace, batch_size: int, weights: torch.Tensor, slack: int,
                 seed: int = 20_261_201,
                 corrections: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None):
        """``weights`` are the samples' scales ``s_k``; ``slack`` how far below ``M`` the tested sets may shrink
        (the sketch keeps ``2 (r + 1) + 8`` columns for the largest rank ``r = M - |set|`` tested, at most ``M``);
        ``corrections`` = (``eps`` per sample, backward signals of the one-hot vectors, one-hot vectors):
        each sample's term then uses its loss vector with the fitted label-entry correction ``e + eps * onehot``
        (the client's float32 ``p_y - 1``), so that the certified samples' terms leave no cancellation noise."""
        net = attack.net
        self.M = batch_size
        self.weights = weights
        self.tol = attack.opts.batch_tol
        self.seed = seed
        self.attack = attack
        self._cache: dict[tuple[int, ...], list[tuple[float, float, float]]] = {}
        self._sketches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]] = {}
        dev = attack.device
        # a tested set leaves room for rank r = M - |set| <= min(slack, M): the sketch keeps 2 (r + 1) + 8 columns
        self.k = 2 * (min(slack, batch_size) + 1) + 8
        self.layers: list[JointLayer] = []
        for i in range(net.depth + 1):
            delta = t64.loss_vectors if i == net.depth else t64.deltas[i]
            if corrections is not None:
                eps, d_one, onehot = corrections
                delta = delta + eps[:, None] * (onehot if i == net.depth else d_one[i])
            G, A, g = attack.G[i], t64.activations[i], attack.g[i]
            if g is not None:
                A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=F64, device=dev)], 1)
            noise = 0.0 if attack.noise is None else float(torch.linalg.vector_norm(attack.noise_norms(i)))
            self.layers.append(JointLayer(i, G, g, delta, A, noise, min(G.shape[0], A.shape[1])))
        # the sketched layers draw their Gaussian matrices in turn from one generator seeded with ``seed``
        self._sketched = [j for j, layer in enumerate(self.layers) if layer.small > self.k]
        self._omegas: tuple[torch.Tensor, ...] | None = None

    def sketched(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
        """Layer ``j``'s ``(O sketched, U, A, ||O sketched||, 3 ||noise sketched||)``, with ``U`` and ``A`` sketched
        on the side ``O`` is (``O`` itself, in float64, for a layer whose smaller side is at most ``k``)."""
        if j not in self._sketches:
            layer = self.layers[j]
            G, g, U, A = layer.G, layer.g, layer.U, layer.A
            if layer.small <= self.k:  # exact: the residual itself
                OS = torch.cat([G.to(F64), g[:, None]], 1) if g is not None else G.to(F64)
                AS = A
                noise = 3 * layer.noise
            else:  # O sketched on its longer side, without a copy of O
                if self._omegas is None:
                    shapes = tuple(max(self.layers[m].G.shape[0], self.layers[m].A.shape[1]) for m in self._sketched)
                    dtypes = {sketch_dtype(self.layers[m].G) for m in self._sketched}  # one for all: float32 or not
                    dtype = torch.float32 if dtypes == {torch.float32} else F64
                    self._omegas = gaussian_sketches(self.seed, shapes, self.k, dtype)
                omega = self._omegas[self._sketched.index(j)].to(layer.U.device)
                tall = G.shape[0] > A.shape[1]
                OS = self.attack.sketch(layer.index, omega, self.seed, left=tall)
                # the terms are sketched in float64 by the same (rounded) matrix, read a piece at a time
                if tall:  # Omega^T O: the terms' backward signals are sketched, their inputs kept whole
                    U, AS = back64(U, omega), A
                else:
                    AS = back64(A, omega)
                noise = 3 * math.sqrt(self.k) * layer.noise
            self._sketches[j] = (OS, U, AS, float(OS.norm()), noise)
        return self._sketches[j]

    def _tails(self, members: list[int]) -> list[tuple[float, float, float]]:
        """Per tested layer: the residual energy beyond rank ``M - |members|``, its threshold, the layer's norm
        (computed once per set of members)."""
        key = tuple(sorted(members))
        if key not in self._cache:
            r = max(self.M - len(members), 0)
            idx = torch.tensor(key, dtype=torch.long, device=self.weights.device)
            out = []
            for j, layer in enumerate(self.layers):
                if r >= layer.small:
                    continue  # a residual of this layer can have any rank up to its size: no test
                if r == 0 and 2 * len(key) <= self.k:  # the whole batch of a few samples: the residual's norm
                    ref = self.attack.layer_norm(layer.index)
                    noise = 3 * layer.noise
                    tail = layer.exact_residual(layer.U[idx].T * self.weights[idx], layer.A[idx])
                    out.append((tail, self.tol * ref + noise, ref))
                    continue
                OS, U, AS, ref, noise = self.sketched(j)
                ev = residual_spectrum(OS, U[idx].T * self.weights[idx], AS[idx])
                out.append((float(ev[r:].sum().sqrt()), self.tol * ref + noise, ref))
            self._cache[key] = out
        return self._cache[key]

    def excess(self, members: list[int]) -> float:
        """The worst layer's residual energy beyond rank ``M - |members|`` over its threshold (pass: ``<= 1``).
        A set larger than ``M`` is measured at rank 0 and never passes."""
        worst = max((tail / max(thr, 1e-300) for tail, thr, _ in self._tails(members)), default=0.0)
        return worst if len(members) <= self.M else worst + 2.0

    def residual(self, members: list[int]) -> float:
        """The worst layer's residual energy beyond rank ``M - |members|`` relative to the layer's gradient."""
        return max((tail / max(ref, 1e-300) for tail, _, ref in self._tails(members)), default=0.0)


def residual_spectrum(OS: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The squared singular values of ``Y = OS - B C``, largest first (the eigenvalues of its Gram matrix on its
    smaller side, clamped at 0). On the CPU through numpy's BLAS and LAPACK, which form ``Y Y^T`` by a symmetric
    rank-k update and solve the eigenproblem 1.8-2.5x faster than torch's (one thread; a 522 x 785 residual, AMD
    EPYC, torch 2.13.0 with MKL, numpy 2 with OpenBLAS); on an Intel Xeon the Gram matrix 1.5x faster (3.5 against
    5.5 ms) and the eigenvalues as fast."""
    gram = residual_gram(OS, B, C)
    if gram.device.type == "cpu":
        return torch.from_numpy(np.linalg.eigvalsh(gram.numpy())[::-1].copy()).clamp_min(0)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def residual_gram(OS: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of ``Y = OS - B C`` on its smaller side; a tall ``Y`` is formed a piece of rows at a time
    (``Y^T Y`` summed over the pieces), never whole."""
    if OS.shape[0] < OS.shape[1]:
        Y = torch.addmm(OS, B, C, alpha=-1) if B.shape[1] else OS
        return symmetric_product(Y.T)
    if not B.shape[1]:
        return symmetric_product(OS)
    step = max(OS.shape[1], PIECE_ENTRIES // OS.shape[1])
    gram = torch.zeros(OS.shape[1], OS.shape[1], dtype=OS.dtype, device=OS.device)
    for s in range(0, OS.shape[0], step):
        gram += symmetric_product(torch.addmm(OS[s : s + step], B[s : s + step], C, alpha=-1))
    return gram


def symmetric_product(Y: torch.Tensor) -> torch.Tensor:
    """``Y^T Y``; on the CPU a Gram product on numpy's BLAS, a symmetric rank-k update (half the work)."""
    return matmul64(Y.T, Y)
