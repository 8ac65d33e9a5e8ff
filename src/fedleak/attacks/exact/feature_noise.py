"""How far a weight delta's own rounding can have moved the features a CNN's head gives back, per unit: the error the
conv blocks' inversion starts from, beyond the gradient's float32 noise (docs/cnn.md, "FedAvg updates").

A FedAvg client rounds ``before - lr * g`` to its dtype, so each entry of the change is off by up to ``nu`` (the
update's :class:`~fedleak.attacks.exact.noise.RoundingNoise`). A sample's features are read from its witness rows at
the head's first dense layer: row ``j`` is ``g_j a`` (``a`` the features, ``g_j`` the row's bias entry) up to that
rounding. Over the rows ``j`` with signs ``s_j`` of their bias entries, ``r = sum_j s_j G_j / S``, ``S = sum_j
|g_j|``, is then within ``(|r| sum_j mu_j + sum_j nu_j) / (S - sum_j mu_j)`` of ``a`` in every unit (``mu_j`` the
bias entry's noise): the derivation needs no assumption on the rounding's distribution, so the conv blocks' bounds
chained from it stay proofs.
"""

from __future__ import annotations

import numpy as np
import torch

from fedleak.attacks.exact.candidates import Candidate
from fedleak.nets.float64 import rows64

EPS64 = float(torch.finfo(torch.float64).eps)


def rounding_reach(attack, candidate: Candidate) -> np.ndarray | None:
    """The per-unit bound on how far the update's rounding can have moved ``candidate``'s features (``acts[0]``)
    from the sample's own: ``|acts[0] - r|`` plus the bound on ``|r - a|`` above (float64, CPU). None where the
    update carries no rounding beyond the gradient's own (a gradient); infinite where no bound is had: the first
    dense layer has no bias or the candidate no witness row there, or the rows' bias entries are within their noise.
    """
    if attack.noise is None:
        return None
    x = candidate.acts[0].reshape(-1)
    rows = candidate.witnesses.get(0, [])
    if attack.g[0] is None or not rows:
        return np.full(x.numel(), np.inf)
    g = attack.g[0][rows]
    mu = attack.noise_b[0][rows]
    total = float(g.abs().sum())
    slack = float(mu.sum())
    if not total > slack:
        return np.full(x.numel(), np.inf)
    signed = rows64(attack.G[0], rows).mul_(torch.sign(g)[:, None])
    r = signed.sum(0).div_(total)
    nu = attack.noise[0].rows(rows).sum(0)
    reach = (r.abs() * slack + nu) / (total - slack)
    # float64 arithmetic of the sums and the quotient: a relative epsilon per row summed, on |r| and the bound
    reach += (len(rows) + 4) * EPS64 * (r.abs() + reach)
    return ((x.to(r.dtype) - r).abs() + reach).cpu().numpy()
