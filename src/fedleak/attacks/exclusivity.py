"""Deterministic exclusivity attack on FedSGD gradients of fully connected ReLU networks.

Algorithms spec §2 (Pan et al., USENIX Security 2022), with our own grouping, checks and certificate:

1. **Top layer.** Every neuron ``j`` of the last ReLU layer that fires for one sample only has a gradient
   row that is a scaled copy of that sample's input to the layer: with a bias the ratio
   ``G[j,:] / g[j]`` *is* the input; without one the row gives its direction and the scale is fitted so
   that the output layer's column ``j`` is parallel to the sample's loss vector. Rows whose implied
   inputs coincide are grouped (the implied input is a much sharper key than the K-dimensional loss
   direction, which is nearly shared by same-label samples at initialisation). Each group is checked by a
   forward pass: the neuron must fire, and the output-layer column must be a positive multiple of the
   candidate's loss vector; the label is that vector's only negative entry.
2. **Walk down.** Knowing a sample's output of hidden layer ``i``, a neuron active for it and for no other
   rebuilt sample gives a candidate input to layer ``i``; the candidate is accepted only if pushing it
   forward reproduces the known output (a neuron shared with a sample not rebuilt fails this). Where no
   row passes and the active units are at least as many as the layer's inputs, the input is solved from
   them by least squares (beyond the paper's condition), accepted only if the system is well conditioned.
3. **Certificate.** Each rebuilt sample's gradient is recomputed (float64) and compared with the observed
   gradient on every row it claims as its own, with a tolerance set by the float32 noise of that row.
   A sample is certified when it explains at least two rows of the last ReLU layer and at least one
   at every other (or that layer was solved), all at one common scale ``1/M``. When the rebuilt samples
   are the whole batch, the recomputed batch gradient must reproduce the observed one: that certifies
   every sample at once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedleak.analysis.forward import forward_trace
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError
from fedleak.models.structure import ReluMLP, as_relu_mlp
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_matches_model

F64 = torch.float64


@dataclass(frozen=True)
class ExclusivityOptions:
    """Tolerances of the exclusivity attack (all relative; see docs/attacks.md for how they were set).

    ``group_tol``: two implied inputs closer than this (relative L2) are the same sample.
    ``core_tol``: the rows that represent a group (and witness it) lie this close to its medoid.
    ``top_tol``: a candidate's output-layer columns must match its loss vector this closely to be kept
    (a loose screen; the certificate is strict).
    ``forward_tol``: a candidate layer input must reproduce the known layer output this closely.
    ``check_tol``: floor of the certificate tolerance on a witness row; the tolerance grows with the
    row's measured float32 noise (``noise_factor`` times it) and a row noisier than ``max_noise`` does not
    count as a witness. ``label_eps_ulps``: how many float32 ulps the label entry of a sample's loss vector
    may be corrected by (the client computes it as ``p_y - 1``, with cancellation).
    ``forward_solve``: solve a layer's input from its active outputs when no exclusive row is left.
    ``rows_per_try`` / ``max_rows``: rows checked per batched forward pass / at most, per sample and layer.
    ``known_scale``: the update is the mean-loss gradient, so its common scale is ``1/M`` and reveals the
    batch size. Set it to False for a scaled gradient (e.g. a one-step FedAvg weight delta, scale
    ``lr/M``): the batch size then comes from ``num_examples`` and the batch certificate fits the factor.
    ``min_last`` / ``min_other``: witnesses a certified sample needs at the last / other ReLU layers.
    """

    group_tol: float = 1e-5
    core_tol: float = 1e-6
    top_tol: float = 1e-3
    forward_tol: float = 1e-5
    check_tol: float = 1e-5
    noise_factor: float = 30.0
    max_noise: float = 1e-4
    scale_tol: float = 1e-4
    batch_tol: float = 1e-4
    forward_solve: bool = True
    solve_max_error: float = 1e-6
    rows_per_try: int = 32
    max_rows: int = 512
    min_last: int = 2
    min_other: int = 1
    known_scale: bool = True
    label_eps_ulps: float = 4.0
    max_witnesses: int = 64


@dataclass
class _Candidate:
    """A sample being rebuilt: its known layer inputs (``acts[i]`` is the input of dense layer i)."""

    label: int
    acts: dict[int, torch.Tensor]
    witnesses: dict[int, list[int]]
    solved: set[int] = field(default_factory=set)
    lowest: int = 0  # lowest dense layer whose input is known

    @property
    def complete(self) -> bool:
        return 0 in self.acts


# -------------------------------------------------------------------------------------------------------
# Helpers


def _tail_forward(net: ReluMLP, W: list[torch.Tensor], b: list[torch.Tensor | None], start: int, a: torch.Tensor):
    """Forward rows ``a`` (n x d_in of dense layer ``start``) to the logits; returns (pre-acts, acts, logits)."""
    pres, acts = [], []
    for i in range(start, net.depth):
        z = a @ W[i].T
        if b[i] is not None:
            z = z + b[i]
        a = torch.relu(z)
        pres.append(z)
        acts.append(a)
    logits = a @ W[-1].T
    if b[-1] is not None:
        logits = logits + b[-1]
    return pres, acts, logits


def _loss_vectors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    e = torch.softmax(logits, dim=-1)
    e[torch.arange(e.shape[0]), labels] -= 1.0
    return e


def _split_runs(proj: torch.Tensor, members: torch.Tensor, gap: float, level: int) -> list[torch.Tensor]:
    """Split ``members`` into runs whose projections ``proj[level]`` are chained within ``gap``;
    split each run again on the next projection, so that long accidental chains break up."""
    order = members[torch.argsort(proj[level][members])]
    vals = proj[level][order]
    cut = torch.nonzero(vals[1:] - vals[:-1] > gap).flatten() + 1
    runs = torch.tensor_split(order, cut.tolist())
    if level + 1 == proj.shape[0]:
        return list(runs)
    out: list[torch.Tensor] = []
    for run in runs:
        out.extend([run] if len(run) == 1 else _split_runs(proj, run, gap, level + 1))
    return out


def _near_pairs(block: torch.Tensor, norms: torch.Tensor, tol: float) -> torch.Tensor:
    """A superset of the pairs of rows within ``tol * max(norms)`` of each other, from one Gram matrix (the
    squared distances' cancellation error, at most ``(d + 4) eps (|a|^2 + |b|^2)``, is added to the bound)."""
    sq = norms * norms
    d2 = sq[:, None] + sq[None, :] - 2 * (block @ block.T)
    slack = 2 * (block.shape[1] + 4) * float(torch.finfo(block.dtype).eps) * (sq[:, None] + sq[None, :])
    return d2 <= (tol * torch.maximum(norms[:, None], norms[None, :])) ** 2 + slack


def _group_rows(R: torch.Tensor, order: torch.Tensor, tol: float) -> list[list[int]]:
    """Group rows of R that coincide within ``tol`` (relative L2); rows are visited in ``order``.

    Rows are bucketed by four random projections of their unit directions (rows within ``tol`` of each
    other stay in one bucket), and only rows of a bucket are compared in full (leader clustering: the
    first unassigned row, in ``order``, leads its group).
    """
    n = R.shape[0]
    if n == 0:
        return []
    norms = R.norm(dim=1).clamp_min(1e-300)
    gen = torch.Generator().manual_seed(12345)
    V = torch.randn(R.shape[1], 4, generator=gen, dtype=R.dtype)
    V /= V.norm(dim=0, keepdim=True)
    proj = ((R / norms[:, None]) @ V).T.contiguous()
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    groups: list[list[int]] = []
    for run in _split_runs(proj, torch.arange(n), 4 * tol, 0):
        if len(run) == 1:
            groups.append([int(run[0])])
            continue
        run = run[torch.argsort(rank[run])]
        block, block_norms = R[run], norms[run]
        near = _near_pairs(block, block_norms, tol)
        assigned = torch.zeros(len(run), dtype=torch.bool)
        for lead in range(len(run)):
            if assigned[lead]:
                continue
            cand = torch.nonzero(near[lead] & ~assigned).flatten()
            dist = (block[cand] - block[lead]).norm(dim=1)
            members = cand[dist <= tol * torch.maximum(block_norms[cand], block_norms[lead])]
            assigned[members] = True
            groups.append([int(x) for x in run[members]])
    groups.sort(key=lambda grp: int(rank[grp[0]]))
    return groups


def _golden_min(cost, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Vectorised golden-section search of ``cost(x)`` (elementwise over a batch) on [lo, hi]."""
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        left = cost(m1) <= cost(m2)
        hi = torch.where(left, m2, hi)
        lo = torch.where(left, lo, m1)
    return (lo + hi) / 2


def _direction_cost(logits: torch.Tensor, labels: torch.Tensor, cdir: torch.Tensor) -> torch.Tensor:
    """1 - cos between loss vectors of ``logits`` (... x K) and unit directions ``cdir`` (... x K)."""
    e = torch.softmax(logits, dim=-1)
    e = e - torch.nn.functional.one_hot(labels, e.shape[-1]).to(e.dtype)
    norm = e.norm(dim=-1)
    cost = 1 - (e * cdir).sum(-1) / norm.clamp_min(1e-300)
    # a loss vector that underflowed (saturated softmax) carries no direction: worst cost
    return torch.where(norm > 1e-150, cost, torch.full_like(cost, 2.0))


def _fit_scales(
    net: ReluMLP, W, b, layer: int, U: torch.Tensor, cdir: torch.Tensor, labels: torch.Tensor, members: list[torch.Tensor]
) -> torch.Tensor:
    """Bias-free layer: for each candidate direction ``U[k]`` find ``alpha`` so that the loss vector of
    ``alpha * U[k]`` is parallel to the output-layer column direction ``cdir[k]``. NaN where none fits.

    When no layer from ``layer`` up has a bias the network is positively homogeneous, so the logits of
    ``alpha * u`` are ``|alpha|`` times those of ``sign(alpha) * u`` and the search costs no forward pass.
    """
    n = U.shape[0]
    alphas = torch.full((n,), float("nan"), dtype=F64)
    if n == 0:
        return alphas
    homogeneous = all(bb is None for bb in b[layer:])
    z = U @ W[layer].T  # n x d_t ; member neurons must fire for the chosen sign
    sign = torch.zeros(n, dtype=F64)
    for k, mem in enumerate(members):
        if bool((z[k, mem] > 0).all()):
            sign[k] = 1.0
        elif bool((z[k, mem] < 0).all()):
            sign[k] = -1.0
    ok = sign != 0
    if not bool(ok.any()):
        return alphas
    idx = torch.nonzero(ok).flatten()
    Us = U[idx] * sign[idx, None]
    grid = torch.logspace(-4, 4, 161, dtype=F64)
    if homogeneous:
        _, _, base = _tail_forward(net, W, b, layer, Us)  # logits of the unit-scale input

        def cost(log_a: torch.Tensor) -> torch.Tensor:  # log_a: (n,) or (n, A)
            a = torch.exp(log_a)
            lg = base[:, None, :] * a[..., None] if a.ndim == 2 else base * a[:, None]
            lab = labels[idx][:, None] if a.ndim == 2 else labels[idx]
            cd = cdir[idx][:, None, :] if a.ndim == 2 else cdir[idx]
            return _direction_cost(lg, lab.expand(lg.shape[:-1]), cd.expand(lg.shape))
    else:

        def cost(log_a: torch.Tensor) -> torch.Tensor:
            a = torch.exp(log_a)
            flat = a.reshape(len(idx), -1)
            X = (flat[..., None] * Us[:, None, :]).reshape(-1, Us.shape[1])
            _, _, lg = _tail_forward(net, W, b, layer, X)
            lg = lg.reshape(*flat.shape, -1)
            c = _direction_cost(lg, labels[idx][:, None].expand(flat.shape), cdir[idx][:, None, :].expand(lg.shape))
            return c.reshape(a.shape)

    log_grid = torch.log(grid)[None, :].expand(len(idx), -1)
    costs = cost(log_grid)
    best = costs.argmin(1)
    centre = log_grid[torch.arange(len(idx)), best]
    step = float(log_grid[0, 1] - log_grid[0, 0])
    refined = _golden_min(cost, centre - step, centre + step)
    alphas[idx] = sign[idx] * torch.exp(refined)
    return alphas


def _backward(W: list[torch.Tensor], pres: list[torch.Tensor], e: torch.Tensor) -> list[torch.Tensor]:
    """Backward signals of every hidden layer for loss vectors ``e`` (rows), given the pre-activations."""
    deltas, d = [], e
    for w, z in zip(reversed(W[1:]), reversed(pres)):
        d = (d @ w) * (z > 0).to(d.dtype)
        deltas.append(d)
    return deltas[::-1]


def _common_scale(scales: list[float], tol: float, integer: bool) -> float | None:
    """The scale at least two samples agree on (the largest such group's median), or None.

    True samples all share one scale (``1/M`` for a mean-loss gradient, so ``1/scale`` must then be a
    whole number when ``integer``). Spurious candidates — "ghosts" blended from samples whose loss vectors
    are parallel, as all same-label loss vectors are with two classes — are self-consistent at their own
    scale, which differs from ghost to ghost; a single candidate therefore never sets the scale.
    """
    arr = np.sort(np.asarray(scales, dtype=float))
    best, best_count = None, 1
    for s in arr:
        members = arr[np.abs(arr / s - 1) <= tol]
        centre = float(np.median(members))
        if integer and abs(1 / centre - round(1 / centre)) > tol * (1 / centre):
            continue
        if len(members) > best_count:
            best, best_count = centre, len(members)
    return best


def _witness_vectors(
    trace_acts: list[torch.Tensor], deltas: list[torch.Tensor], e: torch.Tensor, layer: int, rows: list[int],
    has_bias: bool, top: bool,
) -> torch.Tensor:
    """Per-sample predicted gradient entries of ``rows`` of dense layer ``layer`` (one sample):
    the weight row, the bias entry and, for the top layer, the output layer's column."""
    parts = [deltas[layer][rows, None] * trace_acts[layer][None, :]]
    if has_bias:
        parts.append(deltas[layer][rows, None])
    if top:
        parts.append(trace_acts[layer + 1][rows, None] * e[None, :])
    return torch.cat(parts, dim=1)


def _observed_vectors(G, g, layer: int, rows: list[int], top: bool) -> torch.Tensor:
    parts = [G[layer][rows]]
    if g[layer] is not None:
        parts.append(g[layer][rows, None])
    if top:
        parts.append(G[-1][:, rows].T)
    return torch.cat(parts, dim=1)


# -------------------------------------------------------------------------------------------------------
# The attack


class _ExclusivityAttack:
    def __init__(self, net: ReluMLP, grads: dict[str, torch.Tensor], opts: ExclusivityOptions, obs_dtype):
        self.net, self.opts, self.obs_dtype = net, opts, obs_dtype
        self.W, self.b = net.weights(F64), net.biases(F64)
        self.G = [grads[d.weight_name].to(F64) for d in net.dense]
        self.g = [None if d.bias_name is None else grads[d.bias_name].to(F64) for d in net.dense]
        self.notes: list[str] = []
        self._W_obs: list[torch.Tensor] | None = None

    @property
    def W_obs(self) -> list[torch.Tensor]:
        """The weights in the observed gradient's dtype (the client's arithmetic), converted once."""
        if self._W_obs is None:
            self._W_obs = [w.to(self.obs_dtype) for w in self.W]
        return self._W_obs

    # ---- step 1: candidates from the last ReLU layer ----------------------------------------------------
    def top_candidates(self) -> list[_Candidate]:
        W, G, g, opts = self.W, self.G, self.g, self.opts
        t = self.net.depth - 1
        col = G[-1]  # K x d_t
        col_norm = col.norm(dim=0)
        row_norm = G[t].norm(dim=1)
        # a pure column is a positive multiple of a loss vector: exactly one negative entry (the label);
        # rows failing this cannot belong to any sample's group, so they are screened out first
        usable = (col_norm > 0) & (row_norm > 0) & ((col < 0).sum(0) == 1)
        if g[t] is not None:
            usable &= g[t] != 0
        idx = torch.nonzero(usable).flatten()
        if len(idx) == 0:
            return []
        if g[t] is not None:
            R = G[t][idx] / g[t][idx, None]
            order = torch.argsort(-g[t][idx].abs())
        else:
            R = G[t][idx] / row_norm[idx, None]
            flip = torch.sign(R.gather(1, R.abs().argmax(1, keepdim=True))).squeeze(1)
            R = R * flip[:, None]
            order = torch.argsort(-row_norm[idx])
        groups = _group_rows(R, order, opts.group_tol)
        n_groups = len(groups)
        gid = torch.empty(len(idx), dtype=torch.long)
        for k, grp in enumerate(groups):
            gid[grp] = k
        sizes = torch.bincount(gid, minlength=n_groups)
        reps = torch.zeros(n_groups, R.shape[1], dtype=F64).index_add_(0, gid, R) / sizes[:, None]
        members = [idx[grp] for grp in groups]
        # a row shared with a sample whose backward signal is tiny (a confident one) is a blend that still
        # lies within group_tol of the loud sample's rows; the exclusive rows agree to float32 rounding, so
        # each group is represented by the tight core around its medoid, and only the core are witnesses
        for k in torch.nonzero(sizes >= 3).flatten().tolist():
            block = R[groups[k]]
            pool = block[:64]  # the medoid is sought among (at most) the 64 strongest rows
            medoid = pool[int(torch.cdist(pool, block).median(dim=1).values.argmin())]
            core = (block - medoid).norm(dim=1) <= opts.core_tol * medoid.norm()
            reps[k] = block[core].mean(0)
            members[k] = members[k][core]

        def all_true(flags: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n_groups, dtype=torch.long).index_add_(0, gid, (~flags).long()) == 0

        # every member of a group must carry the same label
        label_of = col[:, idx].argmin(0)
        lo = torch.full((n_groups,), 10**9, dtype=torch.long).scatter_reduce_(0, gid, label_of, "amin")
        hi = torch.full((n_groups,), -1, dtype=torch.long).scatter_reduce_(0, gid, label_of, "amax")
        keep = lo == hi
        if g[t] is None:
            sel = torch.nonzero(keep).flatten()
            unit = col[:, idx] / col_norm[idx]
            cdir = torch.zeros(n_groups, col.shape[0], dtype=F64).index_add_(0, gid, unit.T)[sel]
            cdir = cdir / cdir.norm(dim=1, keepdim=True).clamp_min(1e-300)
            alphas = _fit_scales(self.net, W, self.b, t, reps[sel], cdir, cdir.argmin(1), [members[k] for k in sel])
            keep[sel] = torch.isfinite(alphas)
            reps[sel] = reps[sel] * torch.nan_to_num(alphas)[:, None]
        else:
            # the member neurons must fire for the implied input
            z_rows = (W[t][idx] * reps[gid]).sum(1) + self.b[t][idx]
            keep &= all_true(z_rows > 0)
        sel = torch.nonzero(keep).flatten().tolist()
        cands: list[_Candidate] = []
        for start in range(0, len(sel), 256):
            chunk = sel[start : start + 256]
            pres, acts, logits = _tail_forward(self.net, W, self.b, t, reps[chunk])
            for row, k in enumerate(chunk):
                cand = self._check_top_group(reps[k], members[k], pres[0][row], acts[0][row], logits[row])
                if cand is not None:
                    cands.append(cand)
        return cands

    def _check_top_group(self, r: torch.Tensor, members: torch.Tensor, z: torch.Tensor, a: torch.Tensor,
                         logits: torch.Tensor) -> _Candidate | None:
        t = self.net.depth - 1
        columns = self.G[-1][:, members]
        labels = columns.argmin(0)
        label = int(torch.mode(labels).values)
        e = _loss_vectors(logits[None, :], torch.tensor([label]))[0]
        # members must fire, carry the label, and have columns that are positive multiples of a_j * e; the
        # label entry is left out of the residual (float32 computes it as p_y - 1, with cancellation)
        others = torch.arange(columns.shape[0]) != label
        pred = (a[members][None, :] * e[:, None])[others]
        cols = columns[others]
        scale = (pred * cols).sum(0) / (pred * pred).sum(0).clamp_min(1e-300)
        res = (cols - scale * pred).norm(dim=0) / cols.norm(dim=0).clamp_min(1e-300)
        ok = (z[members] > 0) & (labels == label) & (scale > 0) & (res <= self.opts.top_tol)
        if not bool(ok.any()):
            return None
        return _Candidate(label=label, acts={t: r}, witnesses={t: members[ok].tolist()}, lowest=t)

    # ---- step 2: walk down -------------------------------------------------------------------------------
    def walk_down(self, cands: list[_Candidate]) -> None:
        net = self.net
        for i in range(net.depth - 2, -1, -1):
            level = i + 1  # we know acts[level] (output of hidden layer i) and look for acts[i]
            present = [c for c in cands if level in c.acts]
            if not present:
                return
            support = torch.stack([c.acts[level] > 0 for c in present])  # n x d
            counts = support.sum(0)
            for k, c in enumerate(present):
                found = self._descend(c, i, support[k], counts - 1)
                if found is None and self.opts.forward_solve:
                    found = self._solve(c, i)
                    if found is not None:
                        c.solved.add(i)
                if found is not None:
                    c.acts[i] = found
                    c.lowest = i

    def _descend(self, c: _Candidate, i: int, active: torch.Tensor, shared_with: torch.Tensor) -> torch.Tensor | None:
        """Try the rows of neurons active for ``c`` as its exclusive rows; rows no other candidate uses
        come first (candidates are unverified, so they only order the search; the forward check decides)."""
        W, b, G, g, opts = self.W, self.b, self.G, self.g, self.opts
        target = c.acts[i + 1]
        tnorm = target.norm().clamp_min(1e-300)
        rows = torch.nonzero(active & (G[i].norm(dim=1) > 0)).flatten()
        if g[i] is not None:
            rows = rows[g[i][rows] != 0]
            strength = g[i][rows].abs()
        else:
            strength = G[i][rows].norm(dim=1)
        # fewest other candidates first, then strongest signal (two stable sorts)
        rows = rows[torch.argsort(-strength, stable=True)]
        rows = rows[torch.argsort(shared_with[rows], stable=True)][: opts.max_rows]
        for start in range(0, len(rows), opts.rows_per_try):
            chunk = rows[start : start + opts.rows_per_try]
            if g[i] is not None:
                R = G[i][chunk] / g[i][chunk, None]
                F = R @ W[i].T + b[i]
                out = torch.relu(F)
            else:
                U = G[i][chunk]
                F = U @ W[i].T
                pos, neg = torch.relu(F), torch.relu(-F)
                bp = (pos @ target) / (pos * pos).sum(1).clamp_min(1e-300)
                bn = (neg @ target) / (neg * neg).sum(1).clamp_min(1e-300)
                rp = (pos * bp[:, None] - target).norm(dim=1)
                rn = (neg * bn[:, None] - target).norm(dim=1)
                beta = torch.where(rp <= rn, bp, -bn)
                R = U * beta[:, None]
                out = torch.relu(R @ W[i].T)
            res = (out - target).norm(dim=1) / tnorm
            good = torch.nonzero(res <= opts.forward_tol).flatten()
            if len(good):
                rep = R[good]
                # agreeing rows are witnesses; keep those that coincide with the best one
                best = rep[int(torch.argmin(res[good]))]
                agree = (rep - best).norm(dim=1) <= opts.group_tol * best.norm().clamp_min(1e-300)
                c.witnesses[i] = chunk[good[agree]].tolist()
                return rep[agree].mean(0)
        return None

    def _solve(self, c: _Candidate, i: int) -> torch.Tensor | None:
        """Solve ``W_A a + b_A = target_A`` for the input of dense layer i when it is determined."""
        W, b, opts = self.W, self.b, self.opts
        target = c.acts[i + 1]
        A = target > 0
        n_in = W[i].shape[1]
        if int(A.sum()) < n_in:
            return None
        WA = W[i][A]
        rhs = target[A] - (b[i][A] if b[i] is not None else 0)
        sol = torch.linalg.lstsq(WA, rhs[:, None], driver="gelsd")
        svals = sol.singular_values
        if svals is None or len(svals) < n_in or float(svals.min()) <= 0:
            return None
        a = sol.solution[:, 0]
        # float32 noise of the known output, amplified by the smallest singular value, bounds the error
        noise = float(torch.finfo(self.obs_dtype).eps) * 4 * float(target.abs().max())
        bound = noise * math.sqrt(len(rhs)) / float(svals.min())
        inactive_ok = bool(((W[i][~A] @ a + (b[i][~A] if b[i] is not None else 0)) <= noise * 10).all())
        resid = float((WA @ a - rhs).norm() / rhs.norm().clamp_min(1e-300))
        if bound > opts.solve_max_error * max(1.0, float(a.abs().max())) or not inactive_ok or resid > opts.forward_tol:
            return None
        return a

    # ---- step 3: certificate ----------------------------------------------------------------------------
    def certify(self, cands: list[_Candidate], reported: int | None) -> tuple[list[SampleRecovery], float | None]:
        """Recompute each complete candidate's gradient and test it against its witness rows.

        The model for a witness's observed entries is ``s * (p0 + eps * p1)``: ``p0`` is the recomputed
        per-sample gradient (float64) and ``p1`` its derivative with respect to the label entry of the loss
        vector, whose float32 value ``p_y - 1`` the client computes with cancellation (an absolute error of
        a few ulps, large relative to a confident sample's tiny loss vector). ``s`` (= 1/M) and ``eps`` are
        fitted jointly over all witnesses of the sample; ``|eps|`` must stay within float32 rounding and
        every witness must then match within its own float32 noise level. The batch's common scale is
        ``1/reported`` when the client reported its number of examples, else the scale that at least two
        samples share (see :func:`_common_scale`).
        """
        net, opts = self.net, self.opts
        complete = [c for c in cands if c.complete]
        if not complete:
            return [], None
        X = torch.stack([c.acts[0] for c in complete])
        y = torch.tensor([c.label for c in complete])
        K = net.num_classes
        t64 = forward_trace(net, X, y, dtype=F64, params=(self.W, self.b))
        t32 = forward_trace(net, X.to(self.obs_dtype), y, dtype=self.obs_dtype)
        eps32 = float(torch.finfo(self.obs_dtype).eps)
        onehot = torch.nn.functional.one_hot(y, K).to(F64)
        d_one = _backward(self.W, t64.preactivations, onehot)
        # float32 noise without the label-entry cancellation (that part is fitted): exact e_y, float32 rest
        e32 = t32.loss_vectors.clone()
        e32[torch.arange(len(y)), y] = t64.loss_vectors[torch.arange(len(y)), y].to(self.obs_dtype)
        d32 = _backward(self.W_obs, t32.preactivations, e32)
        eps_bound = opts.label_eps_ulps * eps32
        per_sample: list[dict] = []
        for k, c in enumerate(complete):
            acts64 = [a[k] for a in t64.activations]
            acts32 = [a[k].to(F64) for a in t32.activations]
            consistent = all(
                float((acts64[i] - c.acts[i]).norm()) <= opts.forward_tol * float(acts64[i].norm().clamp_min(1e-300))
                for i in c.acts
            )
            obs, p0, p1, noise, layer_of = [], [], [], [], []
            for i, rows in c.witnesses.items():
                rows = rows[: opts.max_witnesses]  # the strongest rows come first
                top = i == net.depth - 1
                has_bias = self.g[i] is not None
                o = _observed_vectors(self.G, self.g, i, rows, top)
                a0 = _witness_vectors(acts64, [d[k] for d in t64.deltas], t64.loss_vectors[k], i, rows, has_bias, top)
                a1 = _witness_vectors(acts64, [d[k] for d in d_one], onehot[k], i, rows, has_bias, top)
                a32 = _witness_vectors(acts32, [d[k].to(F64) for d in d32], e32[k].to(F64), i, rows, has_bias, top)
                scale = o.norm(dim=1, keepdim=True).clamp_min(1e-300)  # each witness weighs the same
                obs.append(o / scale)
                p0.append(a0 / scale)
                p1.append(a1 / scale)
                noise.append((a32 - a0).norm(dim=1) / a0.norm(dim=1).clamp_min(1e-300) + 8 * eps32)
                layer_of.extend([i] * len(rows))
            noise_t = torch.cat(noise)
            layer_t = torch.tensor(layer_of)
            tol = torch.maximum(torch.full_like(noise_t, opts.check_tol), opts.noise_factor * noise_t)
            ok = noise_t <= opts.max_noise
            s_fit, eps_fit, res = float("nan"), float("nan"), torch.full_like(noise_t, float("inf"))
            for _ in range(3):  # fit on the rows that pass, re-test all rows
                if not bool(ok.any()):
                    break
                # least squares in (s, t = s * eps) through its 2x2 normal equations
                parts = torch.split(ok, [len(o) for o in obs])
                gram = torch.zeros(2, 2, dtype=F64)
                rhs = torch.zeros(2, dtype=F64)
                for o, a0, a1, m in zip(obs, p0, p1, parts):
                    o, a0, a1 = o[m], a0[m], a1[m]
                    gram += torch.stack([torch.stack([(a0 * a0).sum(), (a0 * a1).sum()]),
                                         torch.stack([(a0 * a1).sum(), (a1 * a1).sum()])])
                    rhs += torch.stack([(a0 * o).sum(), (a1 * o).sum()])
                coef = torch.linalg.lstsq(gram, rhs[:, None]).solution[:, 0]
                s_fit, t_fit = float(coef[0]), float(coef[1])
                eps_fit = t_fit / s_fit if s_fit != 0 else float("inf")
                if not abs(eps_fit) <= eps_bound:  # the best correction allowed: at the bound, refit the scale
                    eps_fit = math.copysign(eps_bound, eps_fit) if math.isfinite(eps_fit) else 0.0
                    cc = gram[0, 0] + 2 * eps_fit * gram[0, 1] + eps_fit**2 * gram[1, 1]
                    s_fit = float((rhs[0] + eps_fit * rhs[1]) / cc.clamp_min(1e-300))
                    t_fit = s_fit * eps_fit
                res = torch.cat([(o - s_fit * a0 - t_fit * a1).norm(dim=1) for o, a0, a1 in zip(obs, p0, p1)])
                new_ok = (res <= tol) & (noise_t <= opts.max_noise)
                if torch.equal(new_ok, ok):
                    break
                ok = new_ok
            counts = tuple(int((ok & (layer_t == i)).sum()) for i in range(net.depth))
            worst = float(res[ok].max()) if bool(ok.any()) else float("inf")
            per_sample.append(dict(scale=s_fit, eps=eps_fit, residual=worst, counts=counts, consistent=consistent,
                                   cand=c))
        strong = [
            p["scale"] for p in per_sample
            if p["counts"][-1] >= opts.min_last and p["consistent"] and p["scale"] > 0
        ]
        if opts.known_scale and reported is not None:
            batch_scale = 1.0 / reported
        elif reported == 1 and strong:
            # one sample, unknown factor (e.g. lr/M of a weight delta): no blend exists in a batch of one, so
            # the best-witnessed candidate sets the scale and the whole-batch check decides
            best = max((p for p in per_sample if p["scale"] in strong), key=lambda p: sum(p["counts"]))
            batch_scale = best["scale"]
        else:
            batch_scale = _common_scale(strong, opts.scale_tol, integer=opts.known_scale)
        results = []
        for p in per_sample:
            c = p["cand"]
            missing = [
                i for i in range(net.depth - 1)
                if p["counts"][i] < opts.min_other and i not in c.solved
            ]
            if not p["consistent"]:
                ok, reason = False, "the rebuilt input does not reproduce its own intermediate activations"
            elif p["counts"][-1] < opts.min_last:
                ok, reason = False, (
                    f"only {p['counts'][-1]} verified exclusive neuron(s) at the last ReLU layer "
                    f"(a certificate needs {opts.min_last})"
                )
            elif missing:
                ok, reason = False, f"no verified exclusive neuron at ReLU layer(s) {[m + 1 for m in missing]}"
            elif batch_scale is None:
                ok, reason = False, ("the batch's common scale 1/M is unknown: no batch size was reported and no "
                                     "second sample shares this one's scale")
            elif abs(p["scale"] / batch_scale - 1) > opts.scale_tol:
                ok, reason = False, "scale differs from the batch's common 1/M (a blend of samples, not a sample)"
            else:
                ok, reason = True, "explains its exclusive gradient rows at every layer"
            results.append(
                SampleRecovery(
                    label=c.label, certified=ok, reason=reason, witnesses=p["counts"],
                    solved_layers=tuple(sorted(i + 1 for i in c.solved)), residual=p["residual"], scale=p["scale"],
                )
            )
        return results, batch_scale

    def batch_gradient_matches(self, X: torch.Tensor, y: torch.Tensor, factor: float | None) -> tuple[bool, float]:
        """Recompute the gradient of the rebuilt batch (sum of per-sample gradients times ``factor``,
        which is ``1/M`` for a mean loss; fitted when None) and compare with the observed one."""
        t = forward_trace(self.net, X, y, dtype=F64, params=(self.W, self.b))
        pred, obs = [], []
        for i in range(self.net.depth + 1):
            delta = t.loss_vectors if i == self.net.depth else t.deltas[i]
            pred.append(delta.T @ t.activations[i])
            obs.append(self.G[i])
            if self.g[i] is not None:
                pred.append(delta.sum(0))
                obs.append(self.g[i])
        if factor is None:
            factor = float(sum((p * o).sum() for p, o in zip(pred, obs)) / sum((p * p).sum() for p in pred))
        worst = max(float((factor * p - o).norm() / o.norm().clamp_min(1e-300)) for p, o in zip(pred, obs))
        return worst <= self.opts.batch_tol, worst


def unique_candidates(cands: list[_Candidate], t: int, group_tol: float) -> list[_Candidate]:
    """The same sample can surface twice (its exclusive rows, and blends dominated by it): keep one copy,
    the one with the most witnesses (its exclusive rows)."""
    ordered = sorted(cands, key=lambda c: -len(c.witnesses[t]))
    if not ordered:
        return []
    X = torch.stack([c.acts[t] for c in ordered])
    norms = X.norm(dim=1)
    # one Gram matrix shortlists the near pairs (a superset); the exact norm decides
    labels = torch.tensor([c.label for c in ordered])
    near = (_near_pairs(X, norms, group_tol * 10) & (labels[:, None] == labels[None, :])).numpy()
    kept: list[int] = []
    for k in range(len(ordered)):
        tol = group_tol * 10 * float(norms[k].clamp_min(1e-300))
        close = [u for u in kept if near[k, u]]
        if not any(float((X[u] - X[k]).norm()) <= tol for u in close):
            kept.append(k)
    return [ordered[k] for k in kept]


def _label_counts(net: ReluMLP, G_out_bias: torch.Tensor | None, batch_size: int | None, recovered_probs, labels):
    """Estimate the whole batch's label histogram from the output bias gradient (or None)."""
    if G_out_bias is None or batch_size is None:
        return None
    K = net.num_classes
    known = torch.bincount(labels, minlength=K).to(F64) if len(labels) else torch.zeros(K, dtype=F64)
    n_rec = len(labels)
    p_sum = recovered_probs.sum(0) if n_rec else torch.zeros(K, dtype=F64)
    p_rest = (recovered_probs.mean(0) if n_rec else torch.full((K,), 1.0 / K, dtype=F64)) * (batch_size - n_rec)
    counts = (p_sum + p_rest) - batch_size * G_out_bias
    est = torch.clamp(torch.round(counts), min=0)
    est = torch.maximum(est, known)
    return est.to(torch.int64).numpy()


def exclusivity_on_weights(
    model: nn.Module, update: WeightUpdate, *, input_shape: tuple[int, ...] | None = None, **options
) -> Reconstruction:
    """The exclusivity attack on a one-step FedAvg weight delta with an unknown learning rate.

    For one local SGD step ``before - after = lr * gradient``; the learning rate cancels in every
    ``dW_i / db_i`` ratio, so the attack runs on the delta at the ``before`` weights with
    ``known_scale=False`` and takes the batch size from ``num_examples``. Several local steps mix the
    samples' contributions over changing weights: the certificate then fails rather than mislead.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    check_matches_model(model, {k: v for k, v in update.before.items() if k in set(names)}, "weight update")
    delta = update.delta()
    at_before = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in at_before.named_parameters():
            if n in update.before:
                p.copy_(update.before[n].to(p.dtype))
    grads = GradientUpdate({n: delta[n] for n in names}, num_examples=update.num_examples)
    return exclusivity_attack(at_before, grads, input_shape=input_shape, known_scale=False, **options)


@register_attack("exclusivity", update_kinds=("gradient", "weights"),
                 description="deterministic, certified reconstruction from exclusively activated neurons")
def exclusivity_attack(
    model: nn.Module,
    update: GradientUpdate | dict[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    options: ExclusivityOptions | None = None,
    **overrides,
) -> Reconstruction:
    """Rebuild every sample of a FedSGD batch whose exclusively activated neurons allow it.

    ``update`` is the averaged gradient keyed like ``model.named_parameters()``. Options are the fields of
    :class:`ExclusivityOptions`, passed as keywords or as an ``options`` object. A CNN is handed to
    :func:`fedleak.attacks.conv_exclusivity.conv_exclusivity_attack`.
    """
    from fedleak.models.convnet import is_cnn

    if isinstance(update, WeightUpdate):
        return exclusivity_on_weights(model, update, input_shape=input_shape, options=options, **overrides)
    if is_cnn(model):  # FC head first, then the conv layers as linear systems
        from fedleak.attacks.conv_exclusivity import conv_exclusivity_attack

        return conv_exclusivity_attack(model, update, input_shape=input_shape, **(
            {"options": options} if options is not None else {}), **overrides)
    start = time.perf_counter()
    opts = options or ExclusivityOptions()
    if overrides:
        unknown = set(overrides) - set(ExclusivityOptions.__dataclass_fields__)
        if unknown:
            raise FedleakError(f"unknown option(s) for the exclusivity attack: {sorted(unknown)}")
        opts = ExclusivityOptions(**{**opts.__dict__, **overrides})
    net = as_relu_mlp(model, input_shape)
    if net.depth == 0:
        raise ModelError("the exclusivity attack needs at least one hidden ReLU layer")
    grad_update = as_gradient_update(update)
    check_matches_model(model, grad_update.gradients, "gradient")
    obs_dtype = next(iter(grad_update.gradients.values())).dtype
    if obs_dtype == F64:
        obs_dtype = torch.float64
    attack = _ExclusivityAttack(net, dict(grad_update.gradients), opts, obs_dtype)

    cands = unique_candidates(attack.top_candidates(), net.depth - 1, opts.group_tol)
    attack.walk_down(cands)
    recoveries, batch_scale = attack.certify(cands, grad_update.num_examples)
    complete = [c for c in cands if c.complete]
    batch_size = grad_update.num_examples if not opts.known_scale else None
    if opts.known_scale and batch_scale is not None and batch_scale > 0:
        batch_size = int(round(1.0 / batch_scale))
        if grad_update.num_examples is not None:
            observed = [r.scale for r in recoveries if r.witnesses and r.witnesses[-1] >= opts.min_last]
            if observed and not any(abs(sc / batch_scale - 1) <= opts.scale_tol for sc in observed):
                attack.notes.append(f"no rebuilt sample has the scale 1/{grad_update.num_examples} implied by the "
                                    "reported number of examples; is the update a mean-loss gradient?")

    # the whole-batch certificate: the samples at the common scale, if they are the whole batch, must
    # reproduce the whole observed gradient
    batch_ok = False
    if complete and batch_size is not None and batch_scale is not None:
        at_scale = [k for k, r in enumerate(recoveries) if abs(r.scale / batch_scale - 1) <= opts.scale_tol]
        if len(at_scale) == batch_size:
            Xs = torch.stack([complete[k].acts[0] for k in at_scale])
            ys = torch.tensor([complete[k].label for k in at_scale], dtype=torch.long)
            batch_ok, worst = attack.batch_gradient_matches(Xs, ys, 1.0 / batch_size if opts.known_scale else None)
            if batch_ok:
                if len(at_scale) < len(complete):
                    attack.notes.append(f"{len(complete) - len(at_scale)} spurious candidate(s) dropped: the "
                                        f"{batch_size} certified samples explain the whole gradient")
                complete = [complete[k] for k in at_scale]
                recoveries = [
                    SampleRecovery(recoveries[k].label, True, "the rebuilt batch reproduces the whole observed gradient",
                                   recoveries[k].witnesses, recoveries[k].solved_layers, recoveries[k].residual,
                                   recoveries[k].scale)
                    for k in at_scale
                ]
            else:
                attack.notes.append(f"the rebuilt batch leaves a relative gradient residual of {worst:.2e}")
    dim = net.input_dim
    X = torch.stack([c.acts[0] for c in complete]) if complete else torch.empty(0, dim, dtype=F64)
    y = torch.tensor([c.label for c in complete], dtype=torch.long)
    partial = len(cands) - len(complete)
    if partial:
        attack.notes.append(f"{partial} sample(s) were found at the last ReLU layer but could not be traced to the input")

    probs = torch.softmax(forward_trace(net, X, dtype=F64, params=(attack.W, attack.b)).logits, 1) if complete else torch.empty(0, net.num_classes, dtype=F64)
    counts = _label_counts(net, attack.g[-1], batch_size, probs, y) if opts.known_scale else None
    shape = net.input_shape or (dim,)
    out_dtype = net.dense[0].module.weight.dtype
    return Reconstruction(
        inputs=X.to(out_dtype).reshape(len(complete), *shape),
        labels=y,
        certified=torch.tensor([r.certified for r in recoveries], dtype=torch.bool),
        attack="exclusivity",
        samples=tuple(recoveries),
        batch_size=batch_size,
        label_counts=counts,
        batch_certified=batch_ok,
        seconds=time.perf_counter() - start,
        notes=tuple(attack.notes),
    )
