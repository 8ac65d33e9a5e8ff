"""Step 2 of the head attack: walk a candidate down the head's hidden layers (algorithms spec §2).

Knowing a sample's output of hidden layer ``i``, a neuron active for it and for no other rebuilt sample gives a
candidate input to layer ``i``; the candidate is accepted only if pushing it forward reproduces the known
output (a neuron shared with a sample not rebuilt fails this). Where no row passes and the active units are
at least as many as the layer's inputs, the input is solved from them by least squares (beyond the paper's
condition), accepted only if the system is well conditioned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedleak.attacks.exact.candidates import Candidate
from fedleak.attacks.exact.settle import settled_by_scale
from fedleak.nets.float64 import back64, linear64, row_norms64, rows64, times64


def walk_down(attack, cands: list[Candidate], reported: int | None = None) -> None:
    """Extend every candidate's known activations down to the head's input where the gradient allows. A layer
    without an exclusive row is solved from the candidate's active outputs (``forward_solve``: one
    least-squares solve, with its singular values, per candidate and layer), but not for candidates whose scale
    already rules them out as samples of the batch (:func:`~fedleak.attacks.exact.settle.settled_by_scale`,
    ``reported``: the update's number of examples): on two-class data hundreds of blends of samples."""
    net = attack.net
    ruled_out = {id(cands[k]) for k in settled_by_scale(attack, cands, reported)} if attack.opts.forward_solve \
        else set()
    for i in range(net.depth - 2, -1, -1):
        level = i + 1  # we know acts[level] (output of hidden layer i) and look for acts[i]
        present = [c for c in cands if level in c.acts]
        if not present:
            return
        support = torch.stack([c.acts[level] > 0 for c in present])  # n x d
        targets = torch.stack([c.acts[level] for c in present])
        screens = Screens.of(attack, i, targets)
        tries = row_chunks(attack, support, screens)
        for c, found in zip(present, descend(attack, i, present, targets, tries)):
            if found is None and attack.opts.forward_solve and id(c) not in ruled_out:
                found = solve_layer(attack, c, i)
                if found is not None:
                    c.solved.add(i)
            if found is not None:
                c.acts[i] = found
                c.lowest = i
    unsolved = sum(id(c) in ruled_out and not c.complete for c in cands)
    if unsolved:
        attack.notes.append(f"{unsolved} candidate(s) at scales no sample of the batch can have (blends of samples) "
                            "were not solved for through a layer without exclusive rows")


def row_chunks(attack, support: torch.Tensor, screens: "Screens") -> list[list[torch.Tensor]]:
    """For each candidate (``support``: the neurons active for each, n x the layer's outputs), the rows of its
    active neurons to try as its exclusive rows, in chunks of ``rows_per_try`` (at most ``max_rows`` rows): rows
    fewer other candidates use first, then the strongest (candidates are unverified, so they only order the
    search; the forward check decides). Each chunk keeps only the rows the layer's :class:`Screens` let
    through; chunks left empty are dropped. Every candidate's list is read off one order of all rows."""
    opts = attack.opts
    counts = support.sum(0)
    order = torch.argsort(-screens.strength, stable=True)  # two stable sorts: by count, then by strength
    order = order[torch.argsort(counts[order], stable=True)]
    usable = (support & screens.live[None, :])[:, order]
    place = usable.long().cumsum(1) - 1  # each row's place in its candidate's list
    keep = usable & (place < opts.max_rows) & screens.passes()[order].T
    cand, at = torch.nonzero(keep, as_tuple=True)  # by candidate, then in the order
    slots = opts.max_rows // opts.rows_per_try + 1  # chunks a candidate can have: its chunk j is key slots k + j
    chunk = cand * slots + torch.div(place[cand, at], opts.rows_per_try, rounding_mode="floor")
    key, sizes = torch.unique_consecutive(chunk, return_counts=True)
    tries: list[list[torch.Tensor]] = [[] for _ in range(support.shape[0])]
    owners = torch.div(key, slots, rounding_mode="floor").tolist()
    for k, rows in zip(owners, order[at].split(sizes.tolist())):
        tries[k].append(rows)
    return tries


CHECK_ROWS = 2048  # implied inputs pushed through a layer in one product


def descend(attack, i: int, present: list[Candidate], targets: torch.Tensor,
            tries: list[list[torch.Tensor]]) -> list[torch.Tensor | None]:
    """Each candidate's input to dense layer ``i`` (None where none is found): its chunks of rows
    (:func:`row_chunks`) are tried in turn, and the first chunk with a row that passes the forward check gives
    the input, the agreeing passing rows of that chunk being its witnesses. Every candidate's next chunk is
    checked in one forward pass (a pass reads the whole layer)."""
    opts = attack.opts
    tol = attack.forward_tol(i)
    tnorm = targets.norm(dim=1).clamp_min(1e-300)
    found: list[torch.Tensor | None] = [None] * len(present)
    step = 0
    pending = [k for k, t in enumerate(tries) if t]
    per_pass = max(1, CHECK_ROWS // opts.rows_per_try)  # candidates whose chunks share one pass
    while pending:
        for part in range(0, len(pending), per_pass):
            ks = pending[part : part + per_pass]
            picks = [tries[k][step] for k in ks]
            sizes = [len(p) for p in picks]
            owner = torch.repeat_interleave(torch.tensor(ks, device=targets.device),
                                            torch.tensor(sizes, device=targets.device))
            R, res = forward_check(attack, i, implied_rows(attack, i, torch.cat(picks)), targets[owner], tnorm[owner])
            for k, pick, seg_R, seg_res in zip(ks, picks, R.split(sizes), res.split(sizes)):
                good = torch.nonzero(seg_res <= tol).flatten()
                if len(good):
                    rep = seg_R[good]
                    # agreeing rows are witnesses; keep those that coincide with the best one
                    best = rep[int(torch.argmin(seg_res[good]))]
                    agree = (rep - best).norm(dim=1) <= attack.tol(opts.group_tol) * best.norm().clamp_min(1e-300)
                    present[k].witnesses[i] = pick[good[agree]].tolist()
                    found[k] = rep[agree].mean(0)
        step += 1
        pending = [k for k in pending if found[k] is None and step < len(tries[k])]
    return found


def implied_rows(attack, i: int, rows: torch.Tensor) -> torch.Tensor:
    """The rows' implied inputs of dense layer ``i``: ``G_j / g_j`` with a bias, the rows themselves (a direction,
    scaled in :func:`forward_check`) without one."""
    if attack.g[i] is not None:
        return rows64(attack.G[i], rows) / attack.g[i][rows, None]
    return rows64(attack.G[i], rows)


def forward_check(attack, i: int, X: torch.Tensor, target: torch.Tensor, tnorm: torch.Tensor):
    """Push the implied inputs ``X`` through dense layer ``i``: returns the inputs (scaled to fit the target without
    a bias) and each one's relative residual against the target (``target``: one for all rows, or one per row,
    with its norm ``tnorm``)."""
    W, b = attack.W[i], attack.b
    if b[i] is not None:
        R = X
        out = torch.relu(linear64(R, W) + b[i])
    else:
        F = linear64(X, W)
        pos, neg = torch.relu(F), torch.relu(-F)
        bp = (pos * target).sum(1) / (pos * pos).sum(1).clamp_min(1e-300)
        bn = (neg * target).sum(1) / (neg * neg).sum(1).clamp_min(1e-300)
        rp = (pos * bp[:, None] - target).norm(dim=1)
        rn = (neg * bn[:, None] - target).norm(dim=1)
        beta = torch.where(rp <= rn, bp, -bn)
        R = X * beta[:, None]
        out = torch.relu(linear64(R, W))
    return R, (out - target).norm(dim=1) / tnorm


# with a bias the target's direction alone screens well; without one the target's direction only scales x
# (see Screens), so a random direction orthogonal to it does the screening. A second direction with a bias cost
# more than it saved on every model measured (two and three hidden layers on Fashion-MNIST and LFW)
SCREEN_DIRECTIONS = {True: 1, False: 2}  # by whether the layer has a bias
SCREEN_SEED = 20_261_203
EPS64 = float(torch.finfo(torch.float64).eps)
F64 = torch.float64


@dataclass(frozen=True)
class Screens:
    """The rows of dense layer ``i`` a walk-down tries (``live``, ordered by ``strength``), and necessary
    conditions for an implied input ``x`` (a row of layer ``i``'s gradient, see
    :func:`implied_rows`) to pass :func:`forward_check` against each candidate's target ``t`` within
    ``tau = attack.forward_tol(i) ||t||``, for every row and candidate of the layer from two products.

    On the units ``S`` where ``t`` exceeds ``tau`` a passing ``x`` has ``relu(F_S) = F_S`` with ``F = W x + b``,
    so ``||F_S - t_S|| <= tau``, and so has its projection on any orthonormal ``Q`` (``Q[:, 0] = t_S / ||t_S||``,
    the others random and orthogonal to it). With a bias the screen is ``||Q^T F_S - Q^T t_S|| <= tau``. Without
    one ``x`` is scaled by a fitted ``beta`` first; then ``||Q_rest^T F_S|| <= tau / |beta|`` and
    ``|beta q_0^T F_S| >= ||t_S|| - tau``, so the screen is ``||Q_rest^T F_S|| <= tau |q_0^T F_S| / (||t_S|| - tau)``.
    With a bias ``Q`` is the target's direction alone; without one it adds a random direction.
    ``P[j, k]`` holds row ``j``'s projections ``Q_k^T W_S x_j`` (with ``Q_k^T b_S`` and ``-||t_S||`` folded in with
    a bias); ``slack`` (per unit of ``||x||``) and ``slack0`` cover the rounding of both sides with a wide margin.
    A candidate without a usable screen (``active`` False: fewer units above ``tau`` than directions, or a
    target within ``2 tau`` of zero) lets every row through."""

    P: torch.Tensor  # rows x candidates x directions
    x_norm: torch.Tensor  # rows
    live: torch.Tensor  # rows that can be a sample's: a nonzero gradient row (and bias entry)
    strength: torch.Tensor  # rows: |g_j| with a bias, else ||G_j||
    t_norm: torch.Tensor  # candidates
    tau: torch.Tensor
    slack: torch.Tensor
    slack0: torch.Tensor
    active: torch.Tensor
    bias: bool

    @classmethod
    def of(cls, attack, i: int, targets: torch.Tensor) -> "Screens":
        """The screens of dense layer ``i`` for the candidates' ``targets`` (n x the layer's outputs)."""
        W, G, g = attack.W[i], attack.G[i], attack.g[i]
        n, d_out = targets.shape
        p = SCREEN_DIRECTIONS[attack.b[i] is not None]
        dev = targets.device
        tau = attack.forward_tol(i) * targets.norm(dim=1).clamp_min(1e-300)
        S = targets > tau[:, None]  # n x d_out
        t_s = torch.where(S, targets, torch.zeros_like(targets))
        t_norm = t_s.norm(dim=1)
        active = (S.sum(1) > p) & (t_norm > 2 * tau)
        # orthonormal Q_k on S_k: the target's direction, then random directions (Gram-Schmidt, twice)
        gen = torch.Generator().manual_seed(SCREEN_SEED + i)  # drawn on the CPU: the same on every device
        Z = torch.randn(n, d_out, p - 1, generator=gen, dtype=F64).to(dev) * S[:, :, None]
        cols = [t_s / t_norm.clamp_min(1e-300)[:, None]]
        for j in range(p - 1):
            z = Z[:, :, j]
            for _ in range(2):
                for q in cols:
                    z = z - (z * q).sum(1, keepdim=True) * q
            cols.append(z / z.norm(dim=1, keepdim=True).clamp_min(1e-300))
        Q = torch.stack(cols, 2)  # n x d_out x p, zero off S_k
        V = back64(Q.permute(0, 2, 1).reshape(n * p, d_out), W).T  # d_in x (n p), column k p + j: Q_k's j-th
        row_norm = attack.row_norms(i)
        live = row_norm > 0
        if g is not None:
            live &= g != 0
            P = times64(G, V) / torch.where(g != 0, g, torch.ones_like(g))[:, None]
            x_norm = row_norm / g.abs().clamp_min(1e-300)
            strength = g.abs()
        else:
            P = times64(G, V)
            x_norm = strength = row_norm
        P = P.reshape(d_out, n, p)
        if attack.b[i] is not None:
            P = P + torch.einsum("kop,o->kp", Q, attack.b[i])[None]
            P[:, :, 0] -= t_norm[None, :]
        gamma = 1e3 * (W.shape[1] + S.sum(1).to(F64) + 10) * EPS64
        w_norm = (row_norms64(W).square()[None, :] * S).sum(1).sqrt()
        b_norm = (attack.b[i][None, :] * S).norm(dim=1) if attack.b[i] is not None else torch.zeros_like(t_norm)
        return cls(P, x_norm, live, strength, t_norm, tau, gamma * w_norm, gamma * (b_norm + t_norm), active,
                   attack.b[i] is not None)

    def passes(self) -> torch.Tensor:
        """Which rows may pass which candidate's forward check (rows x candidates; every row for a candidate
        without a usable screen)."""
        tau, t_norm = self.tau[None, :], self.t_norm[None, :]
        slack = self.slack[None, :] * self.x_norm[:, None] + self.slack0[None, :]
        if self.bias:
            ok = self.P.norm(dim=2) <= tau + slack
        else:
            room = (t_norm - tau).clamp_min(1e-300)  # positive wherever the screen is active
            ok = self.P[:, :, 1:].norm(dim=2) <= tau * self.P[:, :, 0].abs() / room + slack * (1 + tau / room)
        return ok | ~self.active[None, :]


def solve_layer(attack, c: Candidate, i: int) -> torch.Tensor | None:
    """Solve ``W_A a + b_A = target_A`` for the input of dense layer i when it is determined."""
    W, b, opts = attack.W[i], attack.b, attack.opts
    tol = attack.forward_tol(i)
    target = c.acts[i + 1]
    A = target > 0
    n_in = W.shape[1]
    if int(A.sum()) < n_in:
        return None
    WA = rows64(W, A)
    rhs = target[A] - (b[i][A] if b[i] is not None else 0)
    # most systems are inconsistent (the rows of a blend of samples, or of a sample whose own rows were not
    # exclusive): a lower bound on their least-squares residual far above forward_tol rules them out at an
    # eighth of the cost of the SVD that the accepted ones need (an accepted one's residual is below forward_tol)
    floor = residual_floor(WA, rhs)
    if floor > 2 * tol:
        return None
    A_cpu, rhs_cpu = WA.cpu(), rhs[:, None].cpu()
    if floor > tol / 4:  # the floor reads a subsystem: one near the tolerance (a weight delta's
        # blends, say) gets the whole system's residual from a QR solve, a quarter of the SVD's cost
        qr = torch.linalg.lstsq(A_cpu, rhs_cpu, driver="gels").solution
        if float((A_cpu @ qr - rhs_cpu).norm() / rhs_cpu.norm().clamp_min(1e-300)) > tol * (1 + 1e-9):
            return None
    # gelsd (the SVD, which gives the singular values) runs on the CPU only
    sol = torch.linalg.lstsq(A_cpu, rhs_cpu, driver="gelsd")
    svals = sol.singular_values
    if svals is None or len(svals) < n_in or float(svals.min()) <= 0:
        return None
    a = sol.solution[:, 0].to(target.device)
    # float32 noise of the known output (or a weight delta's rounding of it, where larger), amplified by the smallest
    # singular value, bounds the error
    noise = max(float(torch.finfo(attack.obs_dtype).eps) * 4, attack.layer_floor(i + 1)) * float(target.abs().max())
    bound = noise * math.sqrt(len(rhs)) / float(svals.min())
    out = linear64(a[None], W)[0] + (b[i] if b[i] is not None else 0)
    inactive_ok = bool((out[~A] <= noise * 10).all())
    resid = float((WA @ a - rhs).norm() / rhs.norm().clamp_min(1e-300))
    if bound > opts.solve_max_error * max(1.0, float(a.abs().max())) or not inactive_ok or resid > tol:
        return None
    return a


FLOOR_ROWS = 16  # rows of a tall system whose complement vectors bound its residual
FLOOR_SPARE = 64  # rows beyond its unknowns a system is bounded on (evenly spaced): the factorisation's cost


def residual_floor(A: torch.Tensor, r: torch.Tensor) -> float:
    """A lower bound on ``min_a ||A a - r|| / ||r||`` for a float64 ``A`` of ``m >= n`` rows, from one LU
    factorisation with partial pivoting, ``P A = [L1; L2] U`` (LAPACK's getrf; half a QR's cost): for a row
    ``i`` of ``L2``, ``z_i = e_i - L1^{-T} l_i`` (over the first ``n`` pivoted rows) has ``z_i^T P A = l_i^T U -
    l_i^T L1^{-1} L1 U = 0`` whatever ``U`` is (a rank-deficient ``A`` too), so ``|z_i^T P r| / ||z_i||`` is at
    most the residual. ``z_i^T P r`` is row ``i``'s residual after the first ``n`` rows are solved; the
    ``FLOOR_ROWS`` rows with the largest are weighed. A taller ``A`` is bounded on ``n + FLOOR_SPARE`` of its
    rows, evenly spaced (a subsystem's residual is at most the whole one's). 0 for a square ``A``."""
    a, b = A.cpu(), r.cpu()
    m, n = a.shape
    norm = float(b.norm())
    if m <= n or norm == 0:
        return 0.0
    if m > n + FLOOR_SPARE:
        keep = torch.linspace(0, m - 1, n + FLOOR_SPARE, dtype=F64).round().long()
        a, b, m = a[keep], b[keep], n + FLOOR_SPARE
    lu, piv = torch.linalg.lu_factor(a)
    order = list(range(m))
    for k, p in enumerate((piv - 1).tolist()):  # getrf's row interchanges, in turn
        order[k], order[p] = order[p], order[k]
    b = b[order]
    L1, L2 = lu[:n], lu[n:]
    c = torch.linalg.solve_triangular(L1, b[:n, None], upper=False, unitriangular=True)[:, 0]
    res = b[n:] - L2 @ c
    top = torch.argsort(-res.abs())[:FLOOR_ROWS]
    X = torch.linalg.solve_triangular(L1.mT, L2[top].mT, upper=True, unitriangular=True)
    return float((res[top].abs() / (1 + X.square().sum(0)).sqrt()).max() / norm)
