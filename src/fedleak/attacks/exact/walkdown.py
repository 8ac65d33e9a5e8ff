"""Step 2 of the head attack: walk a candidate down the head's hidden layers (algorithms spec §2).

Knowing a sample's output of hidden layer ``i``, a neuron active for it and for no other rebuilt sample gives a
candidate input to layer ``i``; the candidate is accepted only if pushing it forward reproduces the known
output (a neuron shared with a sample not rebuilt fails this). Where no row passes and the active units are
at least as many as the layer's inputs, the input is solved from them by least squares (beyond the paper's
condition), accepted only if the system is well conditioned.
"""

from __future__ import annotations

import math

import torch

from fedleak.attacks.exact.candidates import Candidate


def walk_down(attack, cands: list[Candidate]) -> None:
    """Extend every candidate's known activations down to the head's input where the gradient allows."""
    net = attack.net
    for i in range(net.depth - 2, -1, -1):
        level = i + 1  # we know acts[level] (output of hidden layer i) and look for acts[i]
        present = [c for c in cands if level in c.acts]
        if not present:
            return
        support = torch.stack([c.acts[level] > 0 for c in present])  # n x d
        counts = support.sum(0)
        for k, c in enumerate(present):
            found = descend(attack, c, i, support[k], counts - 1)
            if found is None and attack.opts.forward_solve:
                found = solve_layer(attack, c, i)
                if found is not None:
                    c.solved.add(i)
            if found is not None:
                c.acts[i] = found
                c.lowest = i


def descend(attack, c: Candidate, i: int, active: torch.Tensor, shared_with: torch.Tensor) -> torch.Tensor | None:
    """Try the rows of neurons active for ``c`` as its exclusive rows; rows no other candidate uses
    come first (candidates are unverified, so they only order the search; the forward check decides)."""
    W, b, G, g, opts = attack.W, attack.b, attack.G, attack.g, attack.opts
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
            agree = (rep - best).norm(dim=1) <= attack.tol(opts.group_tol) * best.norm().clamp_min(1e-300)
            c.witnesses[i] = chunk[good[agree]].tolist()
            return rep[agree].mean(0)
    return None


def solve_layer(attack, c: Candidate, i: int) -> torch.Tensor | None:
    """Solve ``W_A a + b_A = target_A`` for the input of dense layer i when it is determined."""
    W, b, opts = attack.W, attack.b, attack.opts
    target = c.acts[i + 1]
    A = target > 0
    n_in = W[i].shape[1]
    if int(A.sum()) < n_in:
        return None
    WA = W[i][A]
    rhs = target[A] - (b[i][A] if b[i] is not None else 0)
    # gelsd (the SVD, which gives the singular values) runs on the CPU only
    sol = torch.linalg.lstsq(WA.cpu(), rhs[:, None].cpu(), driver="gelsd")
    svals = sol.singular_values
    if svals is None or len(svals) < n_in or float(svals.min()) <= 0:
        return None
    a = sol.solution[:, 0].to(target.device)
    # float32 noise of the known output, amplified by the smallest singular value, bounds the error
    noise = float(torch.finfo(attack.obs_dtype).eps) * 4 * float(target.abs().max())
    bound = noise * math.sqrt(len(rhs)) / float(svals.min())
    inactive_ok = bool(((W[i][~A] @ a + (b[i][~A] if b[i] is not None else 0)) <= noise * 10).all())
    resid = float((WA @ a - rhs).norm() / rhs.norm().clamp_min(1e-300))
    if bound > opts.solve_max_error * max(1.0, float(a.abs().max())) or not inactive_ok or resid > opts.forward_tol:
        return None
    return a
