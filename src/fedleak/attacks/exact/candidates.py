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

import torch

from fedleak.attacks.exact.float64 import rows64
from fedleak.nets import ReluMLP

F64 = torch.float64
GROUPING_SEED = 12345


@dataclass
class Candidate:
    """A sample being rebuilt: its known layer inputs (``acts[i]`` is the input of dense layer i of the head;
    ``acts[0]`` the head's input, i.e. the network's features), its label and witness rows per layer."""

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


def tail_forward(net: ReluMLP, W: list[torch.Tensor], b: list[torch.Tensor | None], start: int, a: torch.Tensor):
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


def loss_vectors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``softmax(logits) - onehot(labels)`` per row."""
    e = torch.softmax(logits, dim=-1)
    e[torch.arange(e.shape[0], device=e.device), labels] -= 1.0
    return e


def split_runs(proj: torch.Tensor, members: torch.Tensor, gap: float, level: int) -> list[torch.Tensor]:
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
        out.extend([run] if len(run) == 1 else split_runs(proj, run, gap, level + 1))
    return out


def near_pairs(block: torch.Tensor, norms: torch.Tensor, tol: float) -> torch.Tensor:
    """A superset of the pairs of rows within ``tol * max(norms)`` of each other, from one Gram matrix (the
    squared distances' cancellation error, at most ``(d + 4) eps (|a|^2 + |b|^2)``, is added to the bound)."""
    sq = norms * norms
    d2 = sq[:, None] + sq[None, :] - 2 * (block @ block.T)
    slack = 2 * (block.shape[1] + 4) * float(torch.finfo(block.dtype).eps) * (sq[:, None] + sq[None, :])
    return d2 <= (tol * torch.maximum(norms[:, None], norms[None, :])) ** 2 + slack


def group_rows(R: torch.Tensor, order: torch.Tensor, tol: float) -> list[list[int]]:
    """Group rows of R that coincide within ``tol`` (relative L2); rows are visited in ``order``.

    Rows are bucketed by four random projections of their unit directions (rows within ``tol`` of each
    other stay in one bucket). Within a bucket, leader clustering: the first unassigned row, in ``order``,
    leads its group, and its distances to the bucket's unassigned rows decide the members (one pass over the
    bucket per group: a bucket is almost always one sample's rows, one group).
    """
    n = R.shape[0]
    if n == 0:
        return []
    dev = R.device
    norms = R.norm(dim=1).clamp_min(1e-300)
    gen = torch.Generator().manual_seed(GROUPING_SEED)  # drawn on the CPU: the same projections on every device
    V = torch.randn(R.shape[1], 4, generator=gen, dtype=R.dtype).to(dev)
    V /= V.norm(dim=0, keepdim=True)
    proj = ((R @ V) / norms[:, None]).T.contiguous()
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rank[order] = torch.arange(n, device=dev)
    groups: list[list[int]] = []
    for run in split_runs(proj, torch.arange(n, device=dev), 4 * tol, 0):
        if len(run) == 1:
            groups.append([int(run[0])])
            continue
        rest = run[torch.argsort(rank[run])]  # unassigned rows of the bucket, in visiting order
        while len(rest):
            lead = rest[0]
            dist = row_distances(R, rest, R[lead])
            inside = dist <= tol * torch.maximum(norms[rest], norms[lead])
            inside[0] = True
            groups.append(rest[inside].tolist())
            rest = rest[~inside]
    rank_of = rank.tolist()
    groups.sort(key=lambda grp: rank_of[grp[0]])
    return groups


ROW_CHUNK = 256  # rows per piece where a whole-layer temporary is not needed (a piece stays in cache)


def row_distances(R: torch.Tensor, rows: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``(R[rows] - point).norm(dim=1)``, a piece of rows at a time (no float64 copy of the whole layer)."""
    return torch.cat([torch.linalg.vector_norm(R.index_select(0, rows[s : s + ROW_CHUNK]).sub_(point), dim=1)
                      for s in range(0, len(rows), ROW_CHUNK)])


def golden_min(cost, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Vectorised golden-section search of ``cost(x)`` (elementwise over a batch) on [lo, hi]."""
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        left = cost(m1) <= cost(m2)
        hi = torch.where(left, m2, hi)
        lo = torch.where(left, lo, m1)
    return (lo + hi) / 2


def direction_cost(logits: torch.Tensor, labels: torch.Tensor, cdir: torch.Tensor) -> torch.Tensor:
    """1 - cos between loss vectors of ``logits`` (... x K) and unit directions ``cdir`` (... x K)."""
    e = torch.softmax(logits, dim=-1)
    e = e - torch.nn.functional.one_hot(labels, e.shape[-1]).to(e.dtype)
    norm = e.norm(dim=-1)
    cost = 1 - (e * cdir).sum(-1) / norm.clamp_min(1e-300)
    # a loss vector that underflowed (saturated softmax) carries no direction: worst cost
    return torch.where(norm > 1e-150, cost, torch.full_like(cost, 2.0))


def fit_scales(
    net: ReluMLP, W, b, layer: int, U: torch.Tensor, cdir: torch.Tensor, labels: torch.Tensor, members: list[torch.Tensor]
) -> torch.Tensor:
    """Bias-free layer: for each candidate direction ``U[k]`` find ``alpha`` so that the loss vector of
    ``alpha * U[k]`` is parallel to the output-layer column direction ``cdir[k]``. NaN where none fits.

    When no layer from ``layer`` up has a bias the network is positively homogeneous, so the logits of
    ``alpha * u`` are ``|alpha|`` times those of ``sign(alpha) * u`` and the search costs no forward pass.
    """
    n, dev = U.shape[0], U.device
    alphas = torch.full((n,), float("nan"), dtype=F64, device=dev)
    if n == 0:
        return alphas
    homogeneous = all(bb is None for bb in b[layer:])
    z = U @ W[layer].T  # n x d_t ; member neurons must fire for the chosen sign
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
    Us = U[idx] * sign[idx, None]
    grid = torch.logspace(-4, 4, 161, dtype=F64, device=dev)
    if homogeneous:
        _, _, base = tail_forward(net, W, b, layer, Us)  # logits of the unit-scale input

        def cost(log_a: torch.Tensor) -> torch.Tensor:  # log_a: (n,) or (n, A)
            a = torch.exp(log_a)
            lg = base[:, None, :] * a[..., None] if a.ndim == 2 else base * a[:, None]
            lab = labels[idx][:, None] if a.ndim == 2 else labels[idx]
            cd = cdir[idx][:, None, :] if a.ndim == 2 else cdir[idx]
            return direction_cost(lg, lab.expand(lg.shape[:-1]), cd.expand(lg.shape))
    else:

        def cost(log_a: torch.Tensor) -> torch.Tensor:
            a = torch.exp(log_a)
            flat = a.reshape(len(idx), -1)
            X = (flat[..., None] * Us[:, None, :]).reshape(-1, Us.shape[1])
            _, _, lg = tail_forward(net, W, b, layer, X)
            lg = lg.reshape(*flat.shape, -1)
            c = direction_cost(lg, labels[idx][:, None].expand(flat.shape), cdir[idx][:, None, :].expand(lg.shape))
            return c.reshape(a.shape)

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


def top_candidates(attack) -> list[Candidate]:
    """Candidates read from the last ReLU layer's rows (grouped by implied input, checked by a forward pass)."""
    W, G, g, opts = attack.W, attack.G, attack.g, attack.opts
    dev = attack.device
    t = attack.net.depth - 1
    col = G[-1].to(F64)  # K x d_t
    col_norm = col.norm(dim=0)
    row_norm = attack.row_norms(t)
    # a pure column is a positive multiple of a loss vector: exactly one negative entry (the label);
    # rows failing this cannot belong to any sample's group, so they are screened out first
    usable = (col_norm > 0) & (row_norm > 0) & ((col < 0).sum(0) == 1)
    if g[t] is not None:
        usable &= g[t] != 0
    idx = torch.nonzero(usable).flatten()
    if len(idx) == 0:
        return []
    if g[t] is not None:
        R = rows64(G[t], idx).div_(g[t][idx, None])
        order = torch.argsort(-g[t][idx].abs())
    else:
        R = rows64(G[t], idx).div_(row_norm[idx, None])
        flip = torch.sign(R.gather(1, R.abs().argmax(1, keepdim=True))).squeeze(1)
        R = R * flip[:, None]
        order = torch.argsort(-row_norm[idx])
    groups = group_rows(R, order, attack.tol(opts.group_tol))
    n_groups = len(groups)
    gid = torch.empty(len(idx), dtype=torch.long, device=dev)
    for k, grp in enumerate(groups):
        gid[grp] = k
    sizes = torch.bincount(gid, minlength=n_groups)
    # groups of one or two rows are represented by their mean, the others by their core (below)
    few = torch.nonzero(sizes[gid] < 3).flatten()
    reps = torch.zeros(n_groups, R.shape[1], dtype=F64, device=dev).index_add_(
        0, gid[few], R.index_select(0, few)) / sizes[:, None]
    members = [idx[grp] for grp in groups]
    # a row shared with a sample whose backward signal is tiny (a confident one) is a blend that still
    # lies within group_tol of the loud sample's rows; the exclusive rows agree to float32 rounding, so
    # each group is represented by the tight core around its medoid, and only the core are witnesses
    for k in torch.nonzero(sizes >= 3).flatten().tolist():
        grp = torch.as_tensor(groups[k], device=dev)
        pool = R.index_select(0, grp[:64])  # the medoid is sought among (at most) the 64 strongest rows
        # its median distance to the group's rows, in any order (the whole of R when the group is all of it)
        block = R if len(grp) == len(R) else R.index_select(0, grp)
        medoid = pool[int(torch.cdist(pool, block).median(dim=1).values.argmin())].clone()
        del block
        core = row_distances(R, grp, medoid) <= attack.tol(opts.core_tol) * medoid.norm()
        reps[k] = R[grp[core]].mean(0)
        members[k] = members[k][core]

    def all_true(flags: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, dtype=torch.long, device=dev).index_add_(0, gid, (~flags).long()) == 0

    # every member of a group must carry the same label
    label_of = col[:, idx].argmin(0)
    lo = torch.full((n_groups,), 10**9, dtype=torch.long, device=dev).scatter_reduce_(0, gid, label_of, "amin")
    hi = torch.full((n_groups,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, gid, label_of, "amax")
    keep = lo == hi
    if g[t] is None:
        sel = torch.nonzero(keep).flatten()
        unit = col[:, idx] / col_norm[idx]
        cdir = torch.zeros(n_groups, col.shape[0], dtype=F64, device=dev).index_add_(0, gid, unit.T)[sel]
        cdir = cdir / cdir.norm(dim=1, keepdim=True).clamp_min(1e-300)
        alphas = fit_scales(attack.net, W, attack.b, t, reps[sel], cdir, cdir.argmin(1), [members[k] for k in sel])
        keep[sel] = torch.isfinite(alphas)
        reps[sel] = reps[sel] * torch.nan_to_num(alphas)[:, None]
    else:
        # the member neurons must fire for the implied input
        keep &= all_true(row_dots(W[t], idx, reps, gid) + attack.b[t][idx] > 0)
    sel = torch.nonzero(keep).flatten().tolist()
    cands: list[Candidate] = []
    for start in range(0, len(sel), 256):
        chunk = sel[start : start + 256]
        pres, acts, logits = tail_forward(attack.net, W, attack.b, t, reps[chunk])
        cands.extend(check_top_groups(attack, reps[chunk], [members[k] for k in chunk], pres[0], acts[0], logits))
    return cands


def row_dots(W: torch.Tensor, idx: torch.Tensor, reps: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """``W[idx[j]] . reps[gid[j]]`` for every ``j``: the rows of ``W`` are read once, a group's rows at a time
    (one product of the group's rows with its representative; no temporary the size of the rows)."""
    order = torch.argsort(gid, stable=True)
    rows = W[idx[order]]  # grouped: each group's rows are one block
    ends = torch.cumsum(torch.bincount(gid, minlength=len(reps)), 0).tolist()
    out = torch.empty(len(idx), dtype=reps.dtype, device=reps.device)
    out[order] = torch.cat([rows[s:e] @ reps[k] for k, (s, e) in enumerate(zip([0] + ends[:-1], ends))])
    return out


def check_top_groups(attack, reps: torch.Tensor, members: list[torch.Tensor], z: torch.Tensor, a: torch.Tensor,
                     logits: torch.Tensor) -> list[Candidate]:
    """The candidates of groups of rows with implied inputs ``reps`` (n x d), member rows ``members`` and their
    forward pass (pre-activations ``z``, activations ``a``, ``logits``; one row per group); groups that fail
    the checks give none. All groups are checked at once, on their members laid end to end."""
    t = attack.net.depth - 1
    dev = reps.device
    if not members:
        return []
    sizes = torch.tensor([len(m) for m in members], device=dev)
    rows = torch.cat(members)
    owner = torch.repeat_interleave(torch.arange(len(members), device=dev), sizes)  # each member's group
    columns = attack.G[-1][:, rows].T.to(F64)  # members x K
    K = columns.shape[1]
    labels = columns.argmin(1)
    # the group's label: its members' most frequent one (the smallest on a tie)
    votes = torch.zeros(len(members), K, dtype=torch.long, device=dev).index_put_(
        (owner, labels), torch.ones_like(labels), accumulate=True)
    label = votes.argmax(1)
    e = loss_vectors(logits, label)
    # members must fire, carry the label, and have columns that are positive multiples of a_j * e; the
    # label entry is left out of the residual (float32 computes it as p_y - 1, with cancellation)
    others = (torch.arange(K, device=dev)[None, :] != label[owner][:, None]).to(columns.dtype)
    pred = a[owner, rows][:, None] * e[owner] * others
    cols = columns * others
    scale = (pred * cols).sum(1) / (pred * pred).sum(1).clamp_min(1e-300)
    res = (cols - scale[:, None] * pred).norm(dim=1) / cols.norm(dim=1).clamp_min(1e-300)
    ok = (z[owner, rows] > 0) & (labels == label[owner]) & (scale > 0) & (res <= attack.opts.top_tol)
    passing = rows[ok].tolist()
    groups = owner[ok].tolist()
    witnesses: dict[int, list[int]] = {}
    for k, row in zip(groups, passing):
        witnesses.setdefault(k, []).append(row)
    labels_of = label.tolist()
    return [Candidate(label=labels_of[k], acts={t: reps[k]}, witnesses={t: witnesses[k]}, lowest=t)
            for k in sorted(witnesses)]


def unique_candidates(cands: list[Candidate], t: int, group_tol: float) -> list[Candidate]:
    """The same sample can surface twice (its exclusive rows, and blends dominated by it): keep one copy,
    the one with the most witnesses (its exclusive rows)."""
    ordered = sorted(cands, key=lambda c: -len(c.witnesses[t]))
    if not ordered:
        return []
    X = torch.stack([c.acts[t] for c in ordered])
    norms = X.norm(dim=1)
    # one Gram matrix shortlists the near pairs (a superset); the exact norm decides
    labels = torch.tensor([c.label for c in ordered], device=X.device)
    near = (near_pairs(X, norms, group_tol * 10) & (labels[:, None] == labels[None, :])).cpu().numpy()
    norm_list = norms.clamp_min(1e-300).tolist()
    kept: list[int] = []
    for k in range(len(ordered)):
        tol = group_tol * 10 * norm_list[k]
        close = [u for u in kept if near[k, u]]
        if not any(float((X[u] - X[k]).norm()) <= tol for u in close):
            kept.append(k)
    return [ordered[k] for k in kept]
