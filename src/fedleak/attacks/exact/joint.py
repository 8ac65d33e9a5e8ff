"""Whether rebuilt samples can all be samples of the batch *together* (steps 3-5 of the certificate).

* :func:`dead_row_contributions`: a row of the observed gradient that is exactly zero had no contributing
  sample, so a rebuilt input with a term there is not one of the batch's samples.
* :class:`WitnessConflicts`: two samples of the batch cannot both explain a row on their own if both fire on it.
* :class:`~fedleak.attacks.exact.rank_test.JointTest` (in :mod:`fedleak.attacks.exact.rank_test`): subtracting
  the true samples' rank-one terms from a layer's gradient leaves at most ``M - |set|`` directions.
* :class:`IndependenceTest`: a true sample's input is not a combination of the inputs of the samples left in
  the residual; a blend's is.
* :func:`select_consistent`: the largest set of rebuilt samples that passes them.

docs/attacks.md ("The certificate") gives the argument and its assumption.
"""

from __future__ import annotations

import torch

from fedleak.nets import Trace
from fedleak.nets.float64 import back64, row_norms64

F64 = torch.float64


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
        self.layer_norm = attack.layer_norm(t)  # from the row norms the candidates' step took
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
                ref = self.layer_norm
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


def degenerate_loss_vectors(loss_vectors: torch.Tensor, logits: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Which samples' loss vectors a blend of other samples could share: with two classes every loss vector
    is a multiple of ``(1, -1)``; with more, a saturated one (all but ``tol`` of its norm in two entries,
    ``+1`` at the predicted class and ``-1`` at the label) is shared by every sample with the same label and
    prediction, and so, under label smoothing, is one whose predicted probabilities (of ``logits``) lie within
    ``tol`` of its norm from a one-hot vector (``onehot(prediction) - target``, the same for them all). A blend's
    rows then agree as a sample's would, so only :class:`IndependenceTest` refutes it. Other loss vectors differ
    between samples, and so do the output columns of a blend's neurons."""
    if loss_vectors.shape[1] <= 2:
        return torch.ones(loss_vectors.shape[0], dtype=torch.bool, device=loss_vectors.device)
    mags = loss_vectors.abs().sort(dim=1, descending=True).values
    rest = mags[:, 2:].norm(dim=1)
    p = torch.softmax(logits, dim=1)
    off_one_hot = (p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)).norm(dim=1)
    norm = loss_vectors.norm(dim=1)
    return (rest <= tol * norm) | (off_one_hot <= tol * norm)


class WitnessConflicts:
    """How much each rebuilt sample would add to the rows another one claims as its own.

    A witness row of sample ``k`` is explained by ``k`` alone (its fit); if ``k`` and ``l`` are both samples
    of the batch and ``l`` fires on that row, ``l``'s term is in the observed row too, so it must be below the
    row's tolerance. ``Q[k, l]`` is the largest such term of ``l`` on ``k``'s witness rows over the row's
    absolute tolerance (``|s_l delta_l| ||[a_l, 1]||``, plus ``s_l a_l ||e_l||`` on the output column).
    A set passes when, for each member, the terms of all other members add up to at most the tolerance.
    ``Q`` is filled from the samples' traces, a block of samples at a time (:meth:`add`).
    """

    def __init__(self, attack, passing: list[tuple[tuple[int, int, float], ...]], weights: torch.Tensor,
                 among: list[int] | None = None):
        """``passing``: each sample's witness rows as ``(layer, row, absolute tolerance)``; ``weights``: each
        sample's scale in the batch; ``among``: the samples whose conflicts are asked for (all by default):
        ``Q[k, l]`` is computed where ``k`` or ``l`` is among them (so their :meth:`pressure` and the
        :meth:`excess` of sets of them are exact) and left 0 elsewhere."""
        n = len(passing)
        self.attack, self.passing, self.w = attack, passing, weights.abs()
        self.Q = torch.zeros(n, n, dtype=F64, device=weights.device)
        self.inside = sorted(set(range(n)) if among is None else set(among))
        self.others = sorted(set(range(n)) - set(self.inside))

    def add(self, t64: Trace, block: range) -> None:
        """Add the terms of the samples ``block`` (numbers of ``passing``), ``t64`` their trace (row ``l`` of it
        is sample ``block.start + l``)."""
        attack, passing, w, n = self.attack, self.passing, self.w, len(self.passing)
        depth = attack.net.depth
        dev = w.device
        vnorm = [(a**2).sum(1) + (1.0 if attack.g[i] is not None else 0.0)
                 for i, a in enumerate(t64.activations[:depth])]
        enorm = t64.loss_vectors.norm(dim=1)
        # the rows of the samples asked for against every sample, the others' rows against those asked for
        inside = [k for k in self.inside if k in block]
        for owners, samples in ((self.inside, list(block)), (self.others, inside)):
            if not owners or not samples:
                continue
            cols = torch.tensor(samples, dtype=torch.long, device=dev)
            mine = cols - block.start  # their rows in the trace
            for i in range(depth):  # the owners' witness rows of layer i at once, a piece of rows at a time
                entries = [(k, row, tol) for k in owners for layer, row, tol in passing[k] if layer == i]
                step = max(1, (1 << 21) // len(samples))
                for s in range(0, len(entries), step):
                    piece = entries[s : s + step]
                    owner = torch.tensor([k for k, _, _ in piece], dtype=torch.long, device=dev)
                    rows = torch.tensor([r for _, r, _ in piece], dtype=torch.long, device=dev)
                    tols = torch.tensor([t for _, _, t in piece], dtype=F64, device=dev).clamp_min(1e-300)
                    at = (mine[:, None], rows[None, :])  # samples x entries
                    term = t64.deltas[i][at].abs() * vnorm[i][mine].sqrt()[:, None]
                    if i == depth - 1:
                        term = term + t64.activations[i + 1][at] * enorm[mine, None]
                    # Q[k, l]: the largest term of sample l on k's rows, over their tolerances
                    self.Q.view(-1).scatter_reduce_(0, (owner[None, :] * n + cols[:, None]).flatten(),
                                                    (w[cols, None] * term / tols).flatten(), "amax")
        self.Q.fill_diagonal_(0.0)

    def excess(self, members: list[int]) -> float:
        if len(members) < 2:
            return 0.0
        idx = torch.tensor(members, dtype=torch.long, device=self.Q.device)
        return float(self.Q[idx][:, idx].sum(1).max())

    def pressure(self) -> torch.Tensor:
        """How entangled each sample is with the others (on its rows and theirs)."""
        return self.Q.sum(1) + self.Q.sum(0)


def dead_row_contributions(attack, t64: Trace) -> torch.Tensor:
    """For each rebuilt sample, its largest term on a row whose observed gradient is exactly zero, relative to
    the layer's median live row norm, at scale 1 (times its scale in the batch: what it adds there). No sample
    of the batch contributes to such a row, so a sample of the batch has a term there only at the level of its
    own rounding (a confident sample whose float32 loss vector underflowed); a larger term shows the rebuilt
    input is not one of the batch's samples."""
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
        worst = torch.maximum(worst, term.amax(1) / ref)
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
