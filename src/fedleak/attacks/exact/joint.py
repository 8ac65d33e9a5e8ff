"""Whether rebuilt samples can all be samples of the batch *together* (steps 3-5 of the certificate).

* :func:`dead_row_contributions`: a row of the observed gradient that is exactly zero had no contributing
  sample, so a rebuilt input with a term there is not one of the batch's samples.
* :class:`WitnessConflicts`: two samples of the batch cannot both explain a row on their own if both fire on it.
* :class:`JointTest`: subtracting the true samples' rank-one terms from a layer's gradient leaves at most
  ``M - |set|`` directions.
* :class:`IndependenceTest`: a true sample's input is not a combination of the inputs of the samples left in
  the residual; a blend's is.
* :func:`select_consistent`: the largest set of rebuilt samples that passes them.

docs/attacks.md ("The certificate") gives the argument and its assumption.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets import Trace
from fedleak.nets.float64 import PIECE_ENTRIES, back64, pieces64, row_norms64

F64 = torch.float64


SKETCH_CACHE_BYTES = 32 * 2**20  # sketches up to this size (all layers) are kept for the next call


def gaussian_sketches(seed: int, rows: tuple[int, ...], k: int) -> tuple[torch.Tensor, ...]:
    """Gaussian matrices ``rows[j] x k`` (float64, CPU, read only), drawn in turn from one generator seeded with
    ``seed``. A model's layers ask for the same ones at every call: those up to ``SKETCH_CACHE_BYTES`` are cached."""
    if 8 * k * sum(rows) <= SKETCH_CACHE_BYTES:
        return cached_sketches(seed, rows, k)
    return draw_sketches(seed, rows, k)


def draw_sketches(seed: int, rows: tuple[int, ...], k: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, k, generator=gen, dtype=F64) for n in rows)


cached_sketches = functools.lru_cache(maxsize=4)(draw_sketches)


@dataclass(frozen=True)
class JointLayer:
    """One layer of the joint test: its observed gradient ``O = [G | g]`` as the client sent it (never copied
    whole), every candidate's backward signal ``U`` and input ``A`` (one row each; ``A`` ends with a 1 where the
    layer has a bias), the update's own rounding noise ``N`` on ``O`` (or None), and ``small``, ``O``'s smaller
    side."""

    index: int
    G: torch.Tensor
    g: torch.Tensor | None
    U: torch.Tensor
    A: torch.Tensor
    N: torch.Tensor | None
    small: int

    def exact_residual(self, terms: torch.Tensor, inputs: torch.Tensor) -> float:
        """``||O - terms @ inputs||_F``, formed a piece of ``O``'s rows at a time."""
        sq = 0.0
        d_in = self.G.shape[1]
        for s, piece in pieces64(self.G):
            rows = terms[s : s + len(piece)]
            sq += float(torch.linalg.vector_norm(torch.addmm(piece, rows, inputs[:, :d_in], alpha=-1))) ** 2
        if self.g is not None:
            sq += float(torch.linalg.vector_norm(self.g.to(F64) - terms @ inputs[:, d_in])) ** 2
        return math.sqrt(sq)


class JointTest:
    """Whether a set of rebuilt samples, each at its scale, explains every layer's observed gradient jointly.

    The statistic is the residual ``O - sum_set s_k delta_k [a_k, 1]`` 's energy beyond rank ``r = M - |set|``
    (``sqrt`` of the sum of its squared singular values past the ``r``-th), over a threshold ``batch_tol * ||O|| +
    3 ||noise||``; ``excess <= 1`` passes. A set of the whole batch (``r = 0``) of at most ``k / 2`` samples is
    tested exactly: the residual's norm, one pass over the layer that costs less than the sketch of ``k`` columns
    below (on a wide layer, the product of many samples' terms a piece at a time costs more). Otherwise each layer (hidden layers and the output layer) keeps a Gaussian
    sketch of the observed gradient and of each candidate's rank-one term, on the layer's longer side:
    ``O @ Omega`` (``d_out x k``), or ``Omega^T @ O`` (``k x (d_in + 1)``) for a layer with more outputs than
    inputs, taken when the first such set is tested; testing a set then costs one product of the set's terms per
    layer and the Gram matrix of a ``k``-wide residual, and the norms in the threshold are the sketches' (the
    noise's times ``sqrt(k)``). Layers whose smaller side is at most ``k`` are tested exactly, without a sketch.
    """

    def __init__(self, attack, t64: Trace, batch_size: int, weights: torch.Tensor, slack: int,
                 seed: int = 20_261_201, corrections: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None):
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
            N = None
            if attack.noise is not None:
                N = attack.noise[i] if g is None else torch.cat([attack.noise[i], attack.noise_b[i][:, None]], 1)
            self.layers.append(JointLayer(i, G, g, delta, A, N, min(G.shape[0], A.shape[1])))
        # the sketched layers draw their Gaussian matrices in turn from one generator seeded with ``seed``
        self._sketched = [j for j, layer in enumerate(self.layers) if layer.small > self.k]
        self._omegas: tuple[torch.Tensor, ...] | None = None

    def sketched(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
        """Layer ``j``'s ``(O sketched, U, A, ||O sketched||, 3 ||noise sketched||)``, with ``U`` and ``A`` sketched
        on the side ``O`` is (``O`` itself, in float64, for a layer whose smaller side is at most ``k``)."""
        if j not in self._sketches:
            layer = self.layers[j]
            G, g, U, A, N = layer.G, layer.g, layer.U, layer.A, layer.N
            if layer.small <= self.k:  # exact: the residual itself
                OS = torch.cat([G.to(F64), g[:, None]], 1) if g is not None else G.to(F64)
                AS = A
                noise = 3 * float(N.norm()) if N is not None else 0.0
            else:  # O sketched on its longer side, without a copy of O
                if self._omegas is None:
                    shapes = tuple(max(self.layers[m].G.shape[0], self.layers[m].A.shape[1]) for m in self._sketched)
                    self._omegas = gaussian_sketches(self.seed, shapes, self.k)
                omega = self._omegas[self._sketched.index(j)].to(layer.U.device)
                tall = G.shape[0] > A.shape[1]
                OS = self.attack.sketch(layer.index, omega, self.seed, left=tall)
                if tall:  # Omega^T O: the terms' backward signals are sketched, their inputs kept whole
                    U, AS = U @ omega, A
                else:
                    AS = A @ omega
                noise = 3 * math.sqrt(self.k) * float(N.norm()) if N is not None else 0.0
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
                if r == 0 and 2 * len(key) <= self.k:  # the whole batch, of a few samples: the residual's norm
                    ref = self.attack.layer_norm(layer.index)
                    noise = 3 * float(layer.N.norm()) if layer.N is not None else 0.0
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
    EPYC, torch 2.13.0 with MKL, numpy 2 with OpenBLAS)."""
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
    """``Y^T Y``; on the CPU by numpy, whose BLAS call for it is a symmetric rank-k update (half the work)."""
    if Y.device.type != "cpu":
        return Y.T @ Y
    Yn = Y.numpy()
    return torch.from_numpy(Yn.T @ Yn)


class IndependenceTest:
    """Whether each member's input to the last ReLU layer lies outside the span of the inputs that the residual
    still holds.

    At the last ReLU layer a blend's input is a linear combination ``sum lambda_m a_m`` of its constituents'
    inputs. If those constituents are not in the set, their terms stay in the residual
    ``R = O - sum_set s_k delta_k [a_k, 1]^T``, whose row space is spanned by the inputs ``[a_m, 1]`` of the
    samples not in the set. So a blend's input lies in that row space, while a true sample's input is
    independent of the other samples' inputs (distinct samples, ``M`` at most the layer's input size). This
    holds however many "silent" samples (whose terms are below float32 noise) the batch has, which
    :class:`JointTest` cannot tell from room for a blend.

    The row space is that of the residual's singular directions above ``batch_tol`` of the layer's gradient,
    from a Gaussian sketch of ``2 r + 10`` rows (``r = M - |set|``; exact when the layer is smaller). A member
    passes when its input's distance to it is at least ``min_distance`` of the input's norm; when the residual
    fills the whole input space, no member can be told from a blend and none passes.
    """

    def __init__(self, attack, t64: Trace, batch_size: int, weights: torch.Tensor, min_distance: float,
                 tested: list[int], corrections: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 20_261_202):
        """``tested``: the samples whose distance is checked (those a blend could imitate, see
        :func:`degenerate_loss_vectors`); the others pass."""
        t = attack.net.depth - 1
        delta = t64.deltas[t]
        if corrections is not None:
            eps, d_one, _ = corrections
            delta = delta + eps[:, None] * d_one[t]
        A = t64.activations[t]
        if attack.g[t] is not None:
            A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=F64, device=A.device)], 1)
        self.G, self.gb, self.A, self.U = attack.G[t], attack.g[t], A, delta  # O = [G | gb], never copied whole
        self.M, self.weights, self.min_distance = batch_size, weights, min_distance
        self.tested = set(tested)
        self.tol = attack.opts.batch_tol
        self.seed = seed
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def distances(self, members: list[int]) -> torch.Tensor:
        """Each member's relative distance from the residual's row space (1 when nothing is left to span it)."""
        key = tuple(sorted(members))
        if key not in self._cache:
            r = self.M - len(key)
            dev = self.A.device
            idx = torch.tensor(key, dtype=torch.long, device=dev)
            if r <= 0 or not key:
                self._cache[key] = torch.ones(len(key), dtype=F64, device=dev)
                return self._cache[key]
            if r >= self.A.shape[1]:  # the samples left may span every input direction
                self._cache[key] = torch.zeros(len(key), dtype=F64, device=dev)
                return self._cache[key]
            terms = self.U[idx].T * self.weights[idx]  # the members' terms are terms @ A[idx]
            k = 2 * r + 10
            if k >= self.G.shape[0]:  # a small layer: the residual itself
                Y = self.observed().addmm_(terms, self.A[idx], alpha=-1)
                g_norm = torch.linalg.vector_norm(self.G, dtype=F64)
                ref = float(torch.stack([g_norm] + ([self.gb.norm()] if self.gb is not None else [])).norm())
            else:  # L @ (O - terms A), with L @ O read a piece of O's rows at a time (no copy of O)
                L = torch.randn(k, self.G.shape[0], generator=torch.Generator().manual_seed(self.seed), dtype=F64)
                L = L.to(dev)
                LO = back64(L, self.G)
                if self.gb is not None:
                    LO = torch.cat([LO, (L @ self.gb)[:, None]], 1)
                ref = float(LO.norm())
                Y = LO.addmm_(L @ terms, self.A[idx], alpha=-1)
            _, S, Vh = torch.linalg.svd(Y, full_matrices=False)
            basis = Vh[S > self.tol * ref]
            V = self.A[idx]
            if basis.shape[0] >= V.shape[1]:
                self._cache[key] = torch.zeros(len(key), dtype=F64, device=dev)
            else:
                outside = V - (V @ basis.T) @ basis
                self._cache[key] = outside.norm(dim=1) / V.norm(dim=1).clamp_min(1e-300)
        return self._cache[key]

    def observed(self) -> torch.Tensor:
        """A fresh copy of the layer's observed gradient ``O = [G | g]``."""
        if self.gb is None:
            return self.G.to(F64, copy=True)
        R = torch.empty(self.G.shape[0], self.G.shape[1] + 1, dtype=F64, device=self.G.device)
        R[:, :-1] = self.G
        R[:, -1] = self.gb
        return R

    def possible(self, members: list[int]) -> bool:
        """Whether the residual of this set (or of any smaller one) can leave room outside its row space."""
        return self.M - len(members) < self.A.shape[1]

    def excess(self, members: list[int]) -> float:
        """``min_distance`` over the smallest distance of a tested member (pass: ``<= 1``)."""
        if not self.tested.intersection(members):
            return 0.0
        dist = self.distances(members)
        worst = min(float(d) for m, d in zip(sorted(members), dist) if m in self.tested)
        return self.min_distance / max(worst, 1e-300)


def degenerate_loss_vectors(loss_vectors: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Which samples' loss vectors a blend of other samples could share: with two classes every loss vector
    is a multiple of ``(1, -1)``; with more, a saturated one (all but ``tol`` of its norm in two entries,
    ``+1`` at the predicted class and ``-1`` at the label) is shared by every sample with the same label and
    prediction. A blend's rows then agree as a sample's would, so only :class:`IndependenceTest` refutes it.
    Other loss vectors differ between samples, and so do the output columns of a blend's neurons."""
    if loss_vectors.shape[1] <= 2:
        return torch.ones(loss_vectors.shape[0], dtype=torch.bool, device=loss_vectors.device)
    mags = loss_vectors.abs().sort(dim=1, descending=True).values
    rest = mags[:, 2:].norm(dim=1)
    return rest <= tol * loss_vectors.norm(dim=1)


class WitnessConflicts:
    """How much each rebuilt sample would add to the rows another one claims as its own.

    A witness row of sample ``k`` is explained by ``k`` alone (its fit); if ``k`` and ``l`` are both samples
    of the batch and ``l`` fires on that row, ``l``'s term is in the observed row too, so it must be below the
    row's tolerance. ``Q[k, l]`` is the largest such term of ``l`` on ``k``'s witness rows over the row's
    absolute tolerance (``|s_l delta_l| ||[a_l, 1]||``, plus ``s_l a_l ||e_l||`` on the output column).
    A set passes when, for each member, the terms of all other members add up to at most the tolerance.
    """

    def __init__(self, attack, t64: Trace, passing: list[tuple[tuple[int, int, float], ...]], weights: torch.Tensor):
        """``passing``: each sample's witness rows as ``(layer, row, absolute tolerance)``."""
        n = len(passing)
        depth = attack.net.depth
        dev = weights.device
        self.Q = torch.zeros(n, n, dtype=F64, device=dev)
        vnorm = [(a**2).sum(1) + (1.0 if attack.g[i] is not None else 0.0) for i, a in enumerate(t64.activations[:depth])]
        enorm = t64.loss_vectors.norm(dim=1)
        w = weights.abs()
        for i in range(depth):  # every sample's witness rows of layer i at once, a piece of rows at a time
            entries = [(k, row, tol) for k, rows_k in enumerate(passing) for layer, row, tol in rows_k if layer == i]
            step = max(1, (1 << 21) // max(n, 1))
            for s in range(0, len(entries), step):
                piece = entries[s : s + step]
                owner = torch.tensor([k for k, _, _ in piece], dtype=torch.long, device=dev)
                rows = torch.tensor([r for _, r, _ in piece], dtype=torch.long, device=dev)
                tols = torch.tensor([t for _, _, t in piece], dtype=F64, device=dev).clamp_min(1e-300)
                term = t64.deltas[i][:, rows].abs() * vnorm[i].sqrt()[:, None]
                if i == depth - 1:
                    term = term + t64.activations[i + 1][:, rows] * enorm[:, None]
                # Q[k, l]: the largest term of sample l on k's rows, over their tolerances
                worst = torch.zeros(n, n, dtype=F64, device=dev).scatter_reduce_(
                    1, owner.expand(n, -1), w[:, None] * term / tols, "amax")
                self.Q = torch.maximum(self.Q, worst.T)
        self.Q.fill_diagonal_(0.0)

    def excess(self, members: list[int]) -> float:
        if len(members) < 2:
            return 0.0
        idx = torch.tensor(members, dtype=torch.long, device=self.Q.device)
        return float(self.Q[idx][:, idx].sum(1).max())

    def pressure(self) -> torch.Tensor:
        """How entangled each sample is with the others (on its rows and theirs)."""
        return self.Q.sum(1) + self.Q.sum(0)


def dead_row_contributions(attack, t64: Trace, weights: torch.Tensor) -> torch.Tensor:
    """For each rebuilt sample, its largest term on a row whose observed gradient is exactly zero, relative to
    the layer's median live row norm. No sample of the batch contributes to such a row, so a sample of the
    batch has a term there only at the level of its own rounding (a confident sample whose float32 loss vector
    underflowed); a larger term shows the rebuilt input is not one of the batch's samples."""
    depth = attack.net.depth
    worst = torch.zeros(t64.logits.shape[0], dtype=F64, device=t64.logits.device)
    for i in range(depth):
        parts = [attack.row_norms(i)]  # the norms of the rows [G | g | output column], without a copy
        if attack.g[i] is not None:
            parts.append(attack.g[i].abs())
        if i == depth - 1:
            parts.append(row_norms64(attack.G[-1], dim=0))
        norms = torch.stack(parts, 1).norm(dim=1)
        dead = norms == 0
        if not bool(dead.any()) or bool(dead.all()):
            continue
        ref = float(norms[~dead].median())
        v = ((t64.activations[i] ** 2).sum(1) + (1.0 if attack.g[i] is not None else 0.0)).sqrt()
        term = t64.deltas[i][:, dead].abs() * v[:, None]
        if i == depth - 1:
            term = term + t64.activations[i + 1][:, dead] * t64.loss_vectors.norm(dim=1)[:, None]
        worst = torch.maximum(worst, weights.abs() * term.amax(1) / ref)
    return worst


def select_consistent(excess, strong: list[int], suspicion: list[float], max_rounds: int = 16,
                      tries: int = 8) -> tuple[list[int], bool]:
    """The largest subset of ``strong`` whose ``excess(subset) <= 1``, by greedy removal: each round drops, among
    the ``tries`` most suspicious members, the one whose removal leaves the smallest excess. Returns the set
    and whether the search ended within its budget (when it does not, nothing is certified)."""
    members = list(strong)
    for _ in range(max_rounds + 1):
        if not members:
            return [], True
        if excess(members) <= 1.0:
            return members, True
        pool = sorted(members, key=lambda k: -suspicion[k])[:tries]
        drop = min(pool, key=lambda k: excess([m for m in members if m != k]))
        members.remove(drop)
    return [], False
