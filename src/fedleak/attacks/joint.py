"""Whether rebuilt samples can all be samples of the batch *together* (steps 3-5 of the certificate).

* :func:`dead_row_contributions`: a row of the observed gradient that is exactly zero had no contributing
  sample, so a rebuilt input with a term there is not one of the batch's samples.
* :class:`WitnessConflicts`: two samples of the batch cannot both explain a row on their own if both fire on it.
* :class:`JointTest`: subtracting the true samples' rank-one terms from a layer's gradient leaves at most
  ``M - |set|`` directions.
* :func:`select_consistent`: the largest set of rebuilt samples that passes them.

docs/attacks.md ("The certificate") gives the argument and its assumption.
"""

from __future__ import annotations

import math

import torch

from fedleak.analysis.forward import Trace

F64 = torch.float64


class JointTest:
    """Whether a set of rebuilt samples, each at its scale, explains every layer's observed gradient jointly.

    For each layer (hidden layers and the output layer) it keeps a Gaussian sketch ``O @ Omega`` of the
    observed gradient ``O = [G | g]`` and of each candidate's rank-one term, so that testing a set costs one
    ``d_out x |set| x k`` product per layer. The statistic is the residual's energy beyond rank ``r = M - |set|``
    (``sqrt`` of the sum of its squared singular values past the ``r``-th), over a threshold
    ``batch_tol * ||O Omega|| + 3 ||noise Omega||``; ``excess <= 1`` passes. Layers whose smaller side is
    at most ``k`` are tested exactly, without a sketch.
    """

    def __init__(self, attack, t64: Trace, batch_size: int, weights: torch.Tensor, slack: int,
                 seed: int = 20_261_201, corrections: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None):
        """``weights`` are the samples' scales ``s_k``; ``slack`` how far below ``M`` the tested sets may shrink
        (the sketch keeps ``2 (M - |set| + 1) + 8`` columns for the smallest); ``corrections`` = (``eps`` per sample, backward signals of the one-hot vectors, one-hot vectors):
        each sample's term then uses its loss vector with the fitted label-entry correction ``e + eps * onehot``
        (the client's float32 ``p_y - 1``), so that the certified samples' terms leave no cancellation noise."""
        net = attack.net
        self.M = batch_size
        self.weights = weights
        self.tol = attack.opts.batch_tol
        self._cache: dict[tuple[int, ...], list[tuple[float, float, float]]] = {}
        gen = torch.Generator().manual_seed(seed)
        self.layers = []
        k_want = 2 * (slack + 1) + 8
        for i in range(net.depth + 1):
            delta = t64.loss_vectors if i == net.depth else t64.deltas[i]
            if corrections is not None:
                eps, d_one, onehot = corrections
                delta = delta + eps[:, None] * (onehot if i == net.depth else d_one[i])
            O, A, U = attack.G[i], t64.activations[i], delta
            bias = attack.g[i] is not None
            if bias:
                O = torch.cat([O, attack.g[i][:, None]], 1)
                A = torch.cat([A, torch.ones(A.shape[0], 1, dtype=F64)], 1)
            N = None
            if attack.noise is not None:
                N = attack.noise[i] if not bias else torch.cat([attack.noise[i], attack.noise_b[i][:, None]], 1)
            small = min(O.shape)
            if small <= k_want:  # exact: the residual itself
                omega = None
                OS, AS, ref = O, A, float(O.norm())
                noise = 3 * float(N.norm()) if N is not None else 0.0
            else:
                omega = torch.randn(O.shape[1], k_want, generator=gen, dtype=F64)
                OS, AS = O @ omega, A @ omega
                ref = float(OS.norm())
                noise = 3 * math.sqrt(k_want) * float(N.norm()) if N is not None else 0.0
            self.layers.append((OS, U, AS, ref, noise, small))

    def _tails(self, members: list[int]) -> list[tuple[float, float, float]]:
        """Per tested layer: the residual energy beyond rank ``M - |members|``, its threshold, the layer's norm
        (computed once per set of members)."""
        key = tuple(sorted(members))
        if key not in self._cache:
            r = max(self.M - len(members), 0)
            idx = torch.tensor(key, dtype=torch.long)
            out = []
            for OS, U, AS, ref, noise, small in self.layers:
                if r >= small:
                    continue  # a residual of this layer can have any rank up to its size: no test
                Y = OS - (U[idx].T * self.weights[idx]) @ AS[idx] if len(key) else OS
                gram = Y.T @ Y if Y.shape[0] >= Y.shape[1] else Y @ Y.T
                ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
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
        self.Q = torch.zeros(n, n, dtype=F64)
        vnorm = [(a**2).sum(1) + (1.0 if attack.g[i] is not None else 0.0) for i, a in enumerate(t64.activations[:depth])]
        enorm = t64.loss_vectors.norm(dim=1)
        w = weights.abs()
        for k, rows_k in enumerate(passing):
            for i in range(depth):
                sel = [(row, tol) for layer, row, tol in rows_k if layer == i]
                if not sel:
                    continue
                rows = torch.tensor([r for r, _ in sel])
                tols = torch.tensor([t for _, t in sel], dtype=F64).clamp_min(1e-300)
                term = t64.deltas[i][:, rows].abs() * vnorm[i].sqrt()[:, None]
                if i == depth - 1:
                    term = term + t64.activations[i + 1][:, rows] * enorm[:, None]
                self.Q[k] = torch.maximum(self.Q[k], (w[:, None] * term / tols).amax(1))
            self.Q[k, k] = 0.0

    def excess(self, members: list[int]) -> float:
        if len(members) < 2:
            return 0.0
        idx = torch.tensor(members, dtype=torch.long)
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
    worst = torch.zeros(t64.logits.shape[0], dtype=F64)
    for i in range(depth):
        O = attack.G[i] if attack.g[i] is None else torch.cat([attack.G[i], attack.g[i][:, None]], 1)
        if i == depth - 1:
            O = torch.cat([O, attack.G[-1].T], 1)
        norms = O.norm(dim=1)
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
