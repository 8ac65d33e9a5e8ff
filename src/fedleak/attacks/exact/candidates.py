"""Step 1 of the head attack: candidates from the last ReLU layer (algorithms spec §2).

Every neuron ``j`` of the last ReLU layer that fires for one sample only has a gradient row that is a scaled
copy of that sample's input to the layer: with a bias the ratio ``G[j,:] / g[j]`` *is* the input; without
one the row gives its direction and the scale is fitted so that the output layer's column ``j`` is parallel
to the sample's loss vector. Rows whose implied inputs coincide are grouped (the implied input is a much
sharper key than the K-dimensional loss direction, which is nearly shared by same-label samples at
initialisation). Each group is checked by a forward pass: the neuron must fire, and the output-layer column
must be a positive multiple of the candidate's loss vector; the label is that vector's only negative entry.

The functions take the attack's state (:class:`~fedleak.attacks.exact.state.HeadAttack`) and run on its
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedleak.attacks.exact.grouping import DISTANCE_ROWS, ROW_CHUNK, ImpliedInputs, group_rows, near_pairs
from fedleak.attacks.exact.row_span import in_pieces, near_in_span, span_coordinates
from fedleak.attacks.exact.span_screen import span_screen
from fedleak.attacks.exact.top_check import all_fire, fit_top_rows
from fedleak.nets import ReluMLP
from fedleak.nets.float64 import linear64
from fedleak.nets.forward import loss_vectors

F64 = torch.float64


@dataclass
class Candidate:
    """A sample being rebuilt: its known layer inputs (``acts[i]`` is the input of dense layer i of the head;
    ``acts[0]`` the head's input, i.e. the network's features), its label and witness rows per layer; its
    ``scale`` and ``logits`` as the top layer's check read them (the least-squares scale of its witness rows'
    output-layer columns; the float64 logits of its input there)."""

    label: int
    acts: dict[int, torch.Tensor]
    witnesses: dict[int, list[int]]
    solved: set[int] = field(default_factory=set)
    lowest: int = 0  # lowest dense layer whose input is known
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # (acts[0], its first-layer pre-activations, float64)
    scale: float = float("nan")
    logits: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return 0 in self.acts

    @property
    def first_pre(self) -> torch.Tensor | None:
        """The head's first-layer pre-activations of ``acts[0]`` where the top-layer check computed them (a head
        of one hidden layer) and ``acts[0]`` is still that input, else None."""
        if self.first is None or self.acts.get(0) is not self.first[0]:
            return None
        return self.first[1]


# -------------------------------------------------------------------------------------------------------
# Helpers


def tail_forward(net: ReluMLP, W: list[torch.Tensor], b: list[torch.Tensor | None], start: int, a: torch.Tensor):
    """Forward rows ``a`` (n x d_in of dense layer ``start``, float64; or in the weights' own dtype, a cheaper
    pass in it) to the logits; returns (pre-acts, acts, logits)."""
    linear = linear64 if a.dtype == F64 else (lambda x, w: x @ w.T)
    pres, acts = [], []
    for i in range(start, net.depth):
        z = linear(a, W[i])
        if b[i] is not None:
            z = z + b[i].to(z.dtype)
        a = torch.relu(z)
        pres.append(z)
        acts.append(a)
    logits = linear(a, W[-1])
    if b[-1] is not None:
        logits = logits + b[-1].to(logits.dtype)
    return pres, acts, logits


PER_LABEL_GRAM = 128  # more candidates than this are paired one label at a time
PAIR_ENTRIES = 1 << 18  # float64 entries of shortlisted pairs' differences measured at once
CORE_MARGIN = 0.45  # a group within this fraction of the core radius of its leader is all core (0.5 and rounding)


def golden_min(cost, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Vectorised golden-section search of ``cost(x)`` (elementwise over a batch) on [lo, hi]."""
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        left = cost(m1) <= cost(m2)
        hi = torch.where(left, m2, hi)
        lo = torch.where(left, lo, m1)
    return (lo + hi) / 2


def direction_cost(logits: torch.Tensor, labels: torch.Tensor, cdir: torch.Tensor, smoothing: float = 0.0
                   ) -> torch.Tensor:
    """1 - cos between loss vectors of ``logits`` (... x K) and unit directions ``cdir`` (... x K), with label
    ``smoothing`` (:func:`~fedleak.nets.forward.loss_vectors`)."""
    K = logits.shape[-1]
    e = loss_vectors(logits.reshape(-1, K), labels.reshape(-1), smoothing).reshape(logits.shape)
    norm = e.norm(dim=-1)
    cost = 1 - (e * cdir).sum(-1) / norm.clamp_min(1e-300)
    # a loss vector that underflowed (saturated softmax) carries no direction: worst cost
    return torch.where(norm > 1e-150, cost, torch.full_like(cost, 2.0))


def fit_scales(
    net: ReluMLP, W, b, layer: int, U: torch.Tensor, cdir: torch.Tensor, labels: torch.Tensor,
    members: list[torch.Tensor], smoothing: float = 0.0,
) -> torch.Tensor:
    """Bias-free layer: for each candidate direction ``U[k]`` find ``alpha`` so that the loss vector of
    ``alpha * U[k]`` is parallel to the output-layer column direction ``cdir[k]``. NaN where none fits.

    The layers from ``layer`` up to the first one with a bias are positively homogeneous: their pre-activations
    for ``alpha * u`` (``alpha > 0``) are ``alpha`` times those for ``u``. That part of the forward pass is taken
    once, at unit scale, and the search forwards only the layers above it (none when no layer from ``layer`` up
    has a bias: the logits of ``alpha * u`` are then ``alpha`` times those of ``u``).
    """
    n, dev = U.shape[0], U.device
    alphas = torch.full((n,), float("nan"), dtype=F64, device=dev)
    if n == 0:
        return alphas
    z = linear64(U, W[layer])  # n x d_t ; member neurons must fire for the chosen sign
    sign = torch.zeros(n, dtype=F64, device=dev)
    for k, mem in enumerate(members):
        if bool((z[k, mem] > 0).all()):
            sign[k] = 1.0
        elif bool((z[k, mem] < 0).all()):
            sign[k] = -1.0
    ok = sign != 0
    if not bool(ok.any()):
        return alphas
    idx = torch.nonzero(ok).flatten()
    grid = torch.logspace(-4, 4, 161, dtype=F64, device=dev)
    # the first layer with a bias (the output layer is ``net.depth``; ``layer`` itself has one only where it is
    # frozen), and its pre-activations before the bias for the unit-scale inputs, through the bias-free layers
    # below it (layer ``layer``'s product is ``z``)
    biased = next((i for i in range(layer, net.depth + 1) if b[i] is not None), None)
    top = net.depth if biased is None else biased
    base = z[idx] * sign[idx, None]
    for i in range(layer + 1, top + 1):
        base = linear64(torch.relu(base), W[i])

    def cost(log_a: torch.Tensor) -> torch.Tensor:  # log_a: (n,) or (n, A)
        a = torch.exp(log_a)
        grid_shape = a.ndim == 2
        pre = base[:, None, :] * a[..., None] if grid_shape else base * a[:, None]
        if biased is not None:
            pre = pre + b[biased]
            if biased < net.depth:  # a hidden layer: the layers above it, for every scale
                _, _, lg = tail_forward(net, W, b, biased + 1, torch.relu(pre).reshape(-1, pre.shape[-1]))
                pre = lg.reshape(*pre.shape[:-1], -1)
        lab = labels[idx][:, None] if grid_shape else labels[idx]
        cd = cdir[idx][:, None, :] if grid_shape else cdir[idx]
        return direction_cost(pre, lab.expand(pre.shape[:-1]), cd.expand(pre.shape), smoothing)

    log_grid = torch.log(grid)[None, :].expand(len(idx), -1)
    costs = cost(log_grid)
    best = costs.argmin(1)
    centre = log_grid[torch.arange(len(idx), device=dev), best]
    step = float(log_grid[0, 1] - log_grid[0, 0])
    refined = golden_min(cost, centre - step, centre + step)
    alphas[idx] = sign[idx] * torch.exp(refined)
    return alphas


# -------------------------------------------------------------------------------------------------------
# The candidates


CHECK_ENTRIES = 1 << 18  # float64 entries of the groups' pre-activations (and, in the pass, activations) held at once
FIRSTS = 1 / 2  # the part of the top layer's gradient entries the kept pre-activations may take (in float64: the
# float32 layer's size), ...
WEAK_FIRSTS = 1 / 16  # ... and those of weak candidates


def top_candidates(attack) -> list[Candidate]:
    """Candidates read from the last ReLU layer's rows (grouped by implied input, checked by a forward pass)."""
    W, G, g, opts = attack.W, attack.G, attack.g, attack.opts
    dev = attack.device
    t = attack.net.depth - 1
    col = G[-1].to(F64)  # K x d_t
    col_norm = col.norm(dim=0)
    row_norm = attack.row_norms(t)
    # a pure column is a positive multiple of a loss vector: exactly one negative entry (the label);
    # rows failing this cannot belong to any sample's group, so they are screened out first. Under label
    # smoothing every entry off the label is p_c - s/K, negative where p_c < s/K: no sign screen then
    smoothing = attack.opts.smoothing
    usable = (col_norm > 0) & (row_norm > 0)
    if not smoothing:
        usable &= (col < 0).sum(0) == 1
    if g[t] is not None:
        usable &= g[t] != 0
    idx = torch.nonzero(usable).flatten()
    if len(idx) == 0:
        return []
    if g[t] is None and opts.train_dropout:  # the scale of a row's implied input comes from the eval-mode forward
        attack.notes.append("train_dropout reads a last ReLU layer with a bias only: nothing was rebuilt")
        return []
    if g[t] is not None:
        R = ImpliedInputs(G[t], idx, g[t][idx])
        order = torch.argsort(-g[t][idx].abs())
    else:  # the unit row, signed so that its largest entry is positive
        rows = [G[t][idx[s : s + ROW_CHUNK]] for s in range(0, len(idx), ROW_CHUNK)]
        flip = torch.cat([torch.sign(r.gather(1, r.abs().argmax(1, keepdim=True))).squeeze(1) for r in rows])
        R = ImpliedInputs(G[t], idx, row_norm[idx] * flip.to(F64))
        order = torch.argsort(-row_norm[idx])
    R, scan = R.held()
    row_groups = group_rows(R, order, attack.tol(opts.group_tol), scan)
    groups = [grp.rows for grp in row_groups]
    n_groups = len(groups)
    lengths = [len(grp) for grp in groups]
    laid = torch.tensor([row for grp in groups for row in grp], dtype=torch.long, device=dev)  # group by group
    gid = torch.empty(len(idx), dtype=torch.long, device=dev)
    gid[laid] = torch.repeat_interleave(torch.arange(n_groups, device=dev), torch.tensor(lengths, device=dev))
    sizes = torch.bincount(gid, minlength=n_groups)
    # groups of one or two rows are represented by their mean, the others by their core (below)
    few = torch.nonzero(sizes[gid] < 3).flatten()
    reps = torch.zeros(n_groups, R.dim, dtype=F64, device=dev)
    for part, rows in R.pieces(few):  # a piece of rows at a time: no float64 copy of them all
        reps.index_add_(0, gid[part], rows)
    reps.div_(sizes[:, None])
    members = list(idx[laid].split(lengths))
    rows_of = list(members)  # every row of each group (members keeps the core only)
    # a row shared with a sample whose backward signal is tiny (a confident one) is a blend that still
    # lies within group_tol of the loud sample's rows; the exclusive rows agree to float32 rounding, so
    # each group is represented by the tight core around its medoid, and only the core are witnesses.
    # A group whose rows all lie within half the core's radius of its leader is its own core, whichever
    # row is the medoid (any two rows are then within the radius): no medoid is needed
    core_tol = attack.tol(opts.core_tol)
    for k in torch.nonzero(sizes >= 3).flatten().tolist():
        grp = torch.as_tensor(groups[k], device=dev)
        if row_groups[k].spread <= CORE_MARGIN * core_tol:
            reps[k] = R.mean(grp)
            continue
        pool = R.rows(grp[:64])  # the medoid is sought among (at most) the 64 strongest rows
        # its median distance to the group's rows, read a piece of them at a time (no float64 copy of the group)
        dist = torch.cat([torch.cdist(pool, rows) for _, rows in R.pieces(grp, DISTANCE_ROWS)], 1)
        medoid = pool[int(dist.median(dim=1).values.argmin())].clone()
        core = R.distances(grp, medoid) <= core_tol * medoid.norm()
        reps[k] = R.mean(grp[core])
        members[k] = members[k][core]
    del R, scan  # the implied inputs (as large as the layer) are read no more: freed before the forward passes

    # every member of a group must carry the same label (its column's least entry; under label smoothing the
    # check reads each row's label, :func:`~fedleak.attacks.exact.top_check.smoothed_labels`: entries of
    # confident samples tie at about -s/K)
    label_of = col[:, idx].argmin(0) if not smoothing else torch.zeros(len(idx), dtype=torch.long, device=dev)
    lo = torch.full((n_groups,), 10**9, dtype=torch.long, device=dev).scatter_reduce_(0, gid, label_of, "amin")
    hi = torch.full((n_groups,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, gid, label_of, "amax")
    keep = lo == hi
    if opts.train_dropout:  # a lone row passes the training-mode check whatever it holds (:func:`check_top_groups`)
        keep &= sizes >= 2
    if g[t] is None:
        sel = torch.nonzero(keep).flatten()
        unit = col[:, idx] / col_norm[idx]
        cdir = torch.zeros(n_groups, col.shape[0], dtype=F64, device=dev).index_add_(0, gid, unit.T)[sel]
        cdir = cdir / cdir.norm(dim=1, keepdim=True).clamp_min(1e-300)
        alphas = fit_scales(attack.net, W, attack.b, t, reps[sel], cdir, cdir.argmin(1), [members[k] for k in sel],
                            smoothing)
        keep[sel] = torch.isfinite(alphas)
        reps[sel] = reps[sel] * torch.nan_to_num(alphas)[:, None]
    sel = torch.nonzero(keep).flatten()
    if len(sel) < n_groups:  # the groups kept, in place of all (the screen and the check read them as they are)
        reps, members, rows_of = reps[sel], [members[k] for k in sel.tolist()], [rows_of[k] for k in sel.tolist()]
    # groups that surely fail the check are dropped before the forward pass, from one product with the span of
    # the groups' inputs (:mod:`fedleak.attacks.exact.span_screen`)
    hopeful = span_screen(attack, reps, members, rows_of if g[t] is not None else None)
    sel = torch.nonzero(hopeful).flatten().tolist()
    cands: list[Candidate] = []
    step = max(1, CHECK_ENTRIES // W[t].shape[0])  # groups whose forward pass is held at once
    room, weak = (firsts(attack, FIRSTS), firsts(attack, WEAK_FIRSTS)) if t == 0 else (0, 0)
    for start in range(0, len(sel), step):
        chunk = sel[start : start + step]
        pres, acts, logits = tail_forward(attack.net, W, attack.b, t, reps[chunk])
        z = pres[0]
        del pres, acts  # the check reads the pre-activations and the logits: the activations are freed
        if g[t] is not None:  # every row of the group (core or not) must fire for the implied input
            fire = torch.nonzero(all_fire(z, [rows_of[k] for k in chunk])).flatten()
            if len(fire) < len(chunk):
                chunk = [chunk[j] for j in fire.tolist()]
                z, logits = z[fire], logits[fire]
        found = check_top_groups(attack, reps[chunk], [members[k] for k in chunk], z, logits, room, weak)
        room -= sum(c.first is not None for c in found)
        weak -= sum(c.first is not None and len(c.witnesses[t]) < opts.min_last for c in found)
        cands.extend(found)
    return cands


def firsts(attack, share: float) -> int:
    """How many candidates keep their first-layer pre-activations (one float64 row of the layer's width each;
    :attr:`Candidate.first`) in ``share`` of the layer's gradient entries: :data:`FIRSTS` for all, of which
    :data:`WEAK_FIRSTS` for those with fewer than ``min_last`` witnesses (blends, mostly). The certificate's
    forward pass then starts from them instead of a second pass through the layer (a CNN's 25088-wide head: 34
    ms); the hundreds or thousands of blends of two-class data would hold ten times the gradient's size: the
    ones beyond are recomputed."""
    return int(attack.G[0].numel() * share) // attack.W[0].shape[0]


def check_top_groups(attack, reps: torch.Tensor, members: list[torch.Tensor], z: torch.Tensor,
                     logits: torch.Tensor, room: int = 0, weak: int = 0) -> list[Candidate]:
    """The candidates of groups of rows with implied inputs ``reps`` (n x d), member rows ``members`` and their
    forward pass (pre-activations ``z``, ``logits``; one row per group); groups that fail the checks give none.
    All groups are checked at once, on their members laid end to end
    (:func:`~fedleak.attacks.exact.top_check.fit_top_rows`). A head of one hidden layer keeps the pre-activations
    of the first ``room`` candidates, of which at most ``weak`` with fewer than ``min_last`` witnesses."""
    t = attack.net.depth - 1
    if not members:
        return []
    fit = fit_top_rows(attack, members, z, logits)
    ok = fit.passing(attack.top_tol)
    # each group's passing rows, in order (the members are laid end to end by group)
    held, sizes = torch.unique_consecutive(fit.owner[ok], return_counts=True)
    labels_of, rows, xs, zs = fit.label.tolist(), fit.rows[ok].tolist(), reps.unbind(0), z.unbind(0)
    scales, outs = fit.group_scales(ok).tolist(), logits.unbind(0)
    cands = []
    end = 0
    # the pre-activations (a float64 row of the layer's width each) are kept for the certificate's forward pass
    # where a certificate can be had on the sample's own witnesses, and for ``weak`` others, ``room`` in all
    # (:func:`firsts`)
    strong = attack.opts.min_last
    # read with train_dropout, a group's loss vector is its own columns' (:mod:`fedleak.attacks.exact.dropout`):
    # a lone row passes that check whatever it holds, so a group needs two
    fewest = 2 if attack.opts.train_dropout else 1
    for k, size in zip(held.tolist(), sizes.tolist()):
        if size < fewest:
            end += size
            continue
        keep = t == 0 and room > 0 and (size >= strong or weak > 0)
        room -= keep
        if keep and size < strong:
            weak -= 1
        x = xs[k].clone()  # its own copy: a view would keep the chunk's groups that fail the check alive
        first = (x, zs[k].clone()) if keep else None
        cands.append(Candidate(label=labels_of[k], acts={t: x}, witnesses={t: rows[end : end + size]}, lowest=t,
                               first=first, scale=scales[k], logits=outs[k]))
        end += size
    return cands


def unique_candidates(cands: list[Candidate], t: int, group_tol: float) -> list[Candidate]:
    """The same sample can surface twice (its exclusive rows, and blends dominated by it): keep one copy,
    the one with the most witnesses (its exclusive rows)."""
    ordered = sorted(cands, key=lambda c: -len(c.witnesses[t]))
    if not ordered:
        return []
    X = torch.stack([c.acts[t] for c in ordered])
    norms = X.norm(dim=1)
    # a Gram matrix shortlists the near pairs of one label (a superset); the exact norm decides. Many candidates
    # (hundreds of blends on two-class data) get one Gram matrix per label, a few one for all
    labels = np.array([c.label for c in ordered])
    if len(ordered) <= PER_LABEL_GRAM:
        same = torch.from_numpy(labels[:, None] == labels[None, :]).to(X.device)
        near = (near_pairs(X, norms, group_tol * 10) & same).cpu().numpy()
    else:  # from their coordinates on their span, where it is narrow (:mod:`~fedleak.attacks.exact.row_span`)
        coords = span_coordinates(in_pieces(X, ROW_CHUNK), len(X), X.shape[1], max_rank=min(X.shape) // 8)
        near = np.zeros((len(ordered), len(ordered)), dtype=bool)
        for label in np.unique(labels).tolist():
            ids = np.flatnonzero(labels == label)
            at = torch.from_numpy(ids).to(X.device)
            near[np.ix_(ids, ids)] = (near_pairs(X[at], norms[at], group_tol * 10) if coords is None else
                                      near_in_span(coords, norms[at], group_tol * 10, at)).cpu().numpy()
    # a candidate is dropped when an earlier kept one is within its tolerance: the exact distances of the
    # shortlisted pairs first (a piece of pairs at a time: a weight update's tolerance, raised to its rounding,
    # can shortlist tens of thousands of blends' pairs), then one pass in order over the candidates with a pair
    reach = group_tol * 10 * norms.clamp_min(1e-300)
    rows = max(1, PAIR_ENTRIES // len(ordered))  # (k, u): u comes before k, a block of k at a time (no n x n copy)
    pairs = np.concatenate([np.argwhere(np.tril(near[s : s + rows], s - 1)) + (s, 0)
                            for s in range(0, len(ordered), rows)])
    close: dict[int, list[int]] = {}
    step = max(1, PAIR_ENTRIES // X.shape[1])
    for s in range(0, len(pairs), step):
        ks, us = (torch.from_numpy(pairs[s : s + step, j]).to(X.device) for j in (0, 1))
        inside = (torch.linalg.vector_norm(X[us] - X[ks], dim=1) <= reach[ks]).cpu().numpy()
        for k, u in pairs[s : s + step][inside].tolist():
            close.setdefault(k, []).append(u)
    kept = np.ones(len(ordered), dtype=bool)
    for k in sorted(close):
        kept[k] = not kept[close[k]].any()
    return [c for c, keep in zip(ordered, kept) if keep]
