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

import torch
from torch import nn

from fedleak.analysis.forward import forward_trace
from fedleak.attacks.certificate import Certificate, certify
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError
from fedleak.models.structure import ReluMLP, as_relu_mlp
from fedleak.reconstruction import Reconstruction
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_matches_model
from fedleak.validation import validate_fields

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
    ``batch_tol``: the joint test's tolerance: the residual of the observed gradient after the certified
    samples' terms, beyond the rank the other samples can fill, relative to the layer's gradient.
    ``min_distance``: a certified sample's input to the last ReLU layer must lie at least this far (relative)
    from the span of the inputs of the samples not certified (a blend of them lies in it).
    ``exact_tol`` / ``data_range``: a certified input must be known to within ``exact_tol`` of the data's range
    ``(lo, hi)`` (default: the rebuilt input's own min and max); checked where the update's rounding is known
    (weight deltas).
    ``clip_norm``: the per-sample clipping bound ``C`` when the client clipped each sample's gradient to norm
    ``C`` before averaging (DP-SGD without noise, Opacus-style): each sample's scale is then
    ``min(1, C / ||g_k||) / M``, which the certificate recomputes from the rebuilt sample.
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
    clip_norm: float | None = None
    min_distance: float = 1e-3
    exact_tol: float = 1e-4
    data_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        validate_fields(self)


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


# -------------------------------------------------------------------------------------------------------
# The attack


class ExclusivityAttack:
    """The attack's state on one update: the weights and observed gradient in float64, the steps that find
    candidates (:meth:`top_candidates`, :meth:`walk_down`) and the certificate (:meth:`certify`)."""

    def __init__(self, net: ReluMLP, grads: dict[str, torch.Tensor], opts: ExclusivityOptions, obs_dtype,
                 noise: dict[str, torch.Tensor] | None = None):
        self.net, self.opts, self.obs_dtype = net, opts, obs_dtype
        self.W, self.b = net.weights(F64), net.biases(F64)
        self.G = [grads[d.weight_name].to(F64) for d in net.dense]
        self.g = [None if d.bias_name is None else grads[d.bias_name].to(F64) for d in net.dense]
        # absolute rounding noise of the observed values, where the update carries more than the gradient's
        # own float32 noise (a weight delta: the client rounded ``before - lr * g``); None otherwise
        self.noise = None if noise is None else [noise[d.weight_name].to(F64) for d in net.dense]
        self.noise_b = None if noise is None else [
            None if d.bias_name is None else noise[d.bias_name].to(F64) for d in net.dense]
        self.notes: list[str] = []
        self._W_obs: list[torch.Tensor] | None = None
        self.tol_floor = self._noise_floor()

    def _noise_floor(self) -> float:
        """How far apart the update's own rounding can push two rows of one sample (relative): the grouping
        tolerances are at least this. Zero for a gradient; for a weight delta, 4x the 90th percentile of the
        top layer's rows' relative rounding noise."""
        if self.noise is None:
            return 0.0
        t = self.net.depth - 1
        rows = [self.G[t], self.noise[t]]
        if self.g[t] is not None:
            rows = [torch.cat([self.G[t], self.g[t][:, None]], 1), torch.cat([self.noise[t], self.noise_b[t][:, None]], 1)]
        norm = rows[0].norm(dim=1)
        live = norm > 0
        if not bool(live.any()):
            return 0.0
        rel = rows[1].norm(dim=1)[live] / norm[live]
        return 4.0 * float(torch.quantile(rel, 0.9))

    def tol(self, value: float) -> float:
        """A grouping tolerance, raised to the update's rounding-noise floor."""
        return max(value, self.tol_floor)

    def certify(self, cands: list[_Candidate], reported: int | None) -> Certificate:
        """The certificate of the complete candidates (see :mod:`fedleak.attacks.certificate`)."""
        return certify(self, cands, reported)

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
        groups = _group_rows(R, order, self.tol(opts.group_tol))
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
            core = (block - medoid).norm(dim=1) <= self.tol(opts.core_tol) * medoid.norm()
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
                agree = (rep - best).norm(dim=1) <= self.tol(opts.group_tol) * best.norm().clamp_min(1e-300)
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


def estimate_label_counts(net: ReluMLP, G_out_bias: torch.Tensor | None, batch_size: int | None, recovered_probs, labels):
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
    model: nn.Module, update: WeightUpdate, *, input_shape: tuple[int, ...] | None = None,
    options: ExclusivityOptions | None = None, **overrides,
) -> Reconstruction:
    """The exclusivity attack on a one-step FedAvg weight delta with an unknown learning rate.

    For one local SGD step ``before - after = lr * gradient``; the learning rate cancels in every
    ``dW_i / db_i`` ratio, so the attack runs on the delta at the ``before`` weights with
    ``known_scale=False`` and takes the batch size from ``num_examples``. The client rounded
    ``before - lr * g`` to its dtype, an error of up to one unit in the last place of ``after``: at a small
    learning rate that is large relative to ``lr * g``, and the certificate's tolerances grow with it. Several
    local steps mix the samples' contributions over changing weights: the certificate then fails rather than
    mislead.
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
    noise = {n: float(torch.finfo(update.after[n].dtype).eps) * update.after[n].to(F64).abs() for n in names}
    overrides = {**overrides, "known_scale": False}
    if _is_cnn(at_before):
        return _conv_attack(at_before, grads, input_shape, options, overrides)
    return _mlp_attack(at_before, grads, input_shape, _options(options, overrides), noise)


def _is_cnn(model: nn.Module) -> bool:
    from fedleak.models.convnet import is_cnn

    return is_cnn(model)


def _conv_attack(model, update, input_shape, options, overrides: dict) -> Reconstruction:
    """A CNN goes to the conv attack, with its own options (FC-head and conv-layer keywords)."""
    from fedleak.attacks.conv_exclusivity import conv_exclusivity_attack

    return conv_exclusivity_attack(model, update, input_shape=input_shape,
                                   **({"options": options} if options is not None else {}), **overrides)


def _options(options: ExclusivityOptions | None, overrides: dict) -> ExclusivityOptions:
    if options is not None and not isinstance(options, ExclusivityOptions):
        raise FedleakError(f"options must be an ExclusivityOptions, got {type(options).__name__}; or pass the "
                           "options as keywords")
    opts = options or ExclusivityOptions()
    if overrides:
        unknown = set(overrides) - set(ExclusivityOptions.__dataclass_fields__)
        if unknown:
            raise FedleakError(f"unknown option(s) for the exclusivity attack: {sorted(unknown)}")
        opts = ExclusivityOptions(**{**opts.__dict__, **overrides})
    return opts


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
    if isinstance(update, WeightUpdate):
        return exclusivity_on_weights(model, update, input_shape=input_shape, options=options, **overrides)
    if _is_cnn(model):  # FC head first, then the conv layers as linear systems
        return _conv_attack(model, update, input_shape, options, overrides)
    return _mlp_attack(model, update, input_shape, _options(options, overrides))


def _mlp_attack(model: nn.Module, update, input_shape, opts: ExclusivityOptions,
                noise: dict[str, torch.Tensor] | None = None) -> Reconstruction:
    start = time.perf_counter()
    net = as_relu_mlp(model, input_shape)
    if net.depth == 0:
        raise ModelError("the exclusivity attack needs at least one hidden ReLU layer")
    grad_update = as_gradient_update(update)
    check_matches_model(model, grad_update.gradients, "gradient")
    obs_dtype = next(iter(grad_update.gradients.values())).dtype
    attack = ExclusivityAttack(net, dict(grad_update.gradients), opts, obs_dtype, noise)

    cands = unique_candidates(attack.top_candidates(), net.depth - 1, attack.tol(opts.group_tol))
    attack.walk_down(cands)
    cert = attack.certify(cands, grad_update.num_examples)
    complete = [c for c in cands if c.complete]
    batch_size = cert.batch_size
    if opts.known_scale and grad_update.num_examples is not None:
        strong = [r for r in cert.recoveries if r.witnesses and r.witnesses[-1] >= opts.min_last]
        if strong and not any(r.certified for r in strong) and not any(
                abs(r.scale * grad_update.num_examples - 1) <= opts.scale_tol for r in strong):
            attack.notes.append(f"no rebuilt sample has the scale 1/{grad_update.num_examples} implied by the "
                                "reported number of examples; is the update a mean-loss gradient?")
    if cert.batch_certified:
        attack.notes.append("the certified samples are the whole batch and reproduce the whole observed gradient")
    dropped = [k for k, r in enumerate(cert.recoveries) if not r.certified and "blend" in r.reason]
    if dropped:
        attack.notes.append(f"{len(dropped)} rebuilt candidate(s) are blends of samples (their scale or the joint "
                            "test rules them out); they are returned uncertified")
    dim = net.input_dim
    X = torch.stack([c.acts[0] for c in complete]) if complete else torch.empty(0, dim, dtype=F64)
    y = torch.tensor([c.label for c in complete], dtype=torch.long)
    partial = len(cands) - len(complete)
    if partial:
        attack.notes.append(f"{partial} sample(s) were found at the last ReLU layer but could not be traced to the input")

    probs = (torch.softmax(forward_trace(net, X, dtype=F64, params=(attack.W, attack.b)).logits, 1) if complete
             else torch.empty(0, net.num_classes, dtype=F64))
    sure = torch.tensor([r.certified for r in cert.recoveries], dtype=torch.bool)  # only certified labels are known
    counts = estimate_label_counts(net, attack.g[-1], batch_size, probs[sure], y[sure]) if opts.known_scale else None
    shape = net.input_shape or (dim,)
    out_dtype = net.dense[0].module.weight.dtype
    return Reconstruction(
        inputs=X.to(out_dtype).reshape(len(complete), *shape),
        labels=y,
        certified=torch.tensor([r.certified for r in cert.recoveries], dtype=torch.bool),
        attack="exclusivity",
        samples=cert.recoveries,
        batch_size=batch_size,
        label_counts=counts,
        batch_certified=cert.batch_certified,
        joint_residual=cert.joint_residual,
        seconds=time.perf_counter() - start,
        notes=tuple(attack.notes),
    )
