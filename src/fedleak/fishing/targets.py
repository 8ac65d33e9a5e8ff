"""Target assignment (algorithms spec §4.3 Step A): which neuron each sample is to own exclusively.

A target ``(h, j)`` of sample ``m`` asks for ``z_hj(x_m') >= kappa`` and ``z_hj(x_m'') <= -kappa`` for every
other sample. Its price is estimated from the clean pre-activations in units of the L-infinity
perturbation it needs: the owner must rise to ``+kappa``, the strongest other sample must fall to
``-kappa``, and a pre-activation moves by at most ``t * ||J_hj||_1`` under a perturbation of radius ``t``:

    cost(m, j) = max(gamma*kappa - z_mj, max_{m' != m} z_m'j + gamma*kappa) / ||J_hj||_1

Negative costs are free targets (already exclusive with slack); the most negative are preferred, so the
exclusivity slack is spent first. Samples take turns, hardest first (the sample whose best remaining
target is dearest chooses first), and targets are disjoint across samples, so the per-sample LPs
decouple. Deeper layers are assigned after the layers below, on the pre-activations of the region the
lower targets force (spec §4.3 Step B).

At the last ReLU layer only neurons with a clear backward signal are eligible (``|W_out[:, j] . e_m|`` not
cancelling out), so a target is an *effective* ExAN whose gradient row survives float32 noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedleak.fishing.head_arrays import HeadArrays


@dataclass(frozen=True)
class Assignment:
    """``targets[h]`` is an (M x k_h) array of neuron indices (``-1``: no target found)."""

    targets: tuple[np.ndarray, ...]
    patterns: tuple[np.ndarray, ...]  # intended 0/1 patterns per layer (M x d_h), targets forced
    costs: tuple[np.ndarray, ...]  # estimated L-infinity price of each target (M x k_h)

    def owned(self, m: int) -> list[tuple[int, int]]:
        return [(h, int(j)) for h, T in enumerate(self.targets) for j in T[m] if j >= 0]


def _other_max(Z: np.ndarray) -> np.ndarray:
    """For every entry, the largest value in its column among the *other* rows."""
    M = Z.shape[0]
    if M == 1:
        return np.full_like(Z, -np.inf)
    top2 = -np.partition(-Z, 1, axis=0)[:2]
    return np.where(Z >= top2[0][None, :], top2[1][None, :], top2[0][None, :])


def target_costs(Z: np.ndarray, sens: np.ndarray, kappa: float, gamma: float, burden: float = 0.3) -> np.ndarray:
    """Price matrix (M x d) of owning each neuron, in L-infinity units. ``burden`` weighs the total push-down
    the other samples need (each of them pays in its own LP)."""
    need = gamma * kappa
    over = np.maximum(Z + need, 0.0)
    others_sum = over.sum(0)[None, :] - over
    return (np.maximum(need - Z, _other_max(Z) + need) + burden * others_sum) / np.maximum(sens, 1e-12)[None, :]


def squared_costs(Z: np.ndarray, sens: np.ndarray, kappa: float, gamma: float, burden: float = 1.0) -> np.ndarray:
    """Price matrix (M x d) in squared L2 units: the owner's rise to ``gamma*kappa`` and every other sample's
    fall to ``-gamma*kappa``, each divided by the neuron's L2 sensitivity. Summed over the targets, this is
    the batch's total squared perturbation if the rows were orthogonal (what the least-L2 LPs pay); every
    other sample's fall is paid in full, so ``burden`` is not used."""
    del burden
    need = gamma * kappa
    down = np.maximum(Z + need, 0.0) ** 2
    up = np.maximum(need - Z, 0.0) ** 2
    return (down.sum(0)[None, :] - down + up) / np.maximum(sens, 1e-12)[None, :] ** 2


def assign_jointly(cost: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` disjoint targets per sample of least total price (a linear assignment of M*k slots to neurons)."""
    from scipy.optimize import linear_sum_assignment

    M, d = cost.shape
    out = np.full((M, k), -1, dtype=np.int64)
    price = np.full((M, k), np.inf)
    finite = np.isfinite(cost)
    big = (np.abs(cost[finite]).max() if finite.any() else 1.0) * 1e3 + 1.0
    C = np.repeat(np.where(finite, cost, big), k, axis=0)
    rows, cols = linear_sum_assignment(C)
    fill = np.zeros(M, dtype=np.int64)
    for r, j in zip(rows, cols):
        m = r // k
        if finite[m, j]:
            out[m, fill[m]] = j
            price[m, fill[m]] = cost[m, j]
            fill[m] += 1
    return out, price


def assign(cost: np.ndarray, k: int, used: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint greedy assignment: ``k`` rounds, in each the sample with the dearest best option picks first."""
    M, d = cost.shape
    used = np.zeros(d, dtype=bool) if used is None else used.copy()
    out = np.full((M, k), -1, dtype=np.int64)
    price = np.full((M, k), np.inf)
    for r in range(k):
        avail = np.where(used[None, :], np.inf, cost)
        best = avail.min(1)
        order = np.argsort(-np.where(np.isfinite(best), best, -np.inf), kind="stable")
        # samples with no finite option go last (they get nothing)
        for m in order:
            row = np.where(used, np.inf, cost[m])
            j = int(np.argmin(row))
            if not np.isfinite(row[j]):
                continue
            out[m, r] = j
            price[m, r] = row[j]
            used[j] = True
    return out, price


@dataclass(frozen=True)
class Pricing:
    """How targets are priced and assigned for one perturbation norm."""

    costs: Callable[..., np.ndarray]  # (Z, sens, kappa, gamma, burden) -> M x d prices
    assign: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    order: int  # the norm of the sensitivities ||J_hj||


PRICING: dict[str, Pricing] = {
    # least L2: squared prices, one joint assignment of least total price
    "l2": Pricing(squared_costs, assign_jointly, 2),
    # L-infinity (and L1 within a budget): the dearest sample chooses first
    "linf": Pricing(target_costs, assign, 1),
    "l1": Pricing(target_costs, assign, 1),
}


def sensitivities(net: HeadArrays, mean_patterns: list[np.ndarray], order: int = 1) -> list[np.ndarray]:
    """Per layer, ``||J_hj||`` (``order`` 1: how far a unit L-infinity step moves each neuron; 2: a unit L2
    step) of the mean region."""
    out = []
    J = None
    for h in range(net.depth):
        if J is None:  # the first layer's Jacobian is its weights: their row norms are kept by the head
            J = net.W[h]
            out.append(net.row_norms(h, order))
            continue
        J = (net.W[h] * mean_patterns[h - 1][None, :]) @ J
        out.append(np.linalg.norm(J, ord=order, axis=1))
    return out


def effective_mask(net: HeadArrays, a_last: np.ndarray, labels: np.ndarray, min_ratio: float = 1e-2) -> np.ndarray:
    """(M x d_H) True where the last-layer backward signal ``W_out[:, j] . e_m`` does not cancel out."""
    W = net.W[-1]
    logits = a_last @ W.T
    if net.b[-1] is not None:
        logits = logits + net.b[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = p.copy()
    e[np.arange(len(labels)), labels] -= 1.0
    delta = e @ W
    scale = np.abs(e) @ np.abs(W)
    return np.abs(delta) >= min_ratio * np.maximum(scale, 1e-300)


def choose_targets(
    net: HeadArrays,
    X: np.ndarray,
    labels: np.ndarray,
    k_per_layer: list[int],
    kappa: float,
    *,
    gamma: float = 2.0,
    fixed: np.ndarray | None = None,
    burden: float = 0.3,
    norm: str = "l2",
    preacts: list[np.ndarray] | None = None,
) -> Assignment:
    """Assign ``k_per_layer[h]`` disjoint targets per sample and layer (spec §4.3 Steps A and B), priced for
    the LPs' ``norm`` (:data:`PRICING`). ``fixed`` samples will not move (they own nothing and block every
    neuron they fire on). ``preacts``: ``net.preacts(X)`` when the caller has it."""
    pricing = PRICING[norm]
    M = X.shape[0]
    fixed = np.zeros(M, dtype=bool) if fixed is None else fixed
    Zs = net.preacts(X) if preacts is None else preacts
    mean_pat = [(z > 0).mean(0) for z in Zs]
    sens = sensitivities(net, mean_pat, order=pricing.order)
    targets, patterns, costs = [], [], []
    a = X
    for h in range(net.depth):
        if h == 0:
            Z = Zs[0]  # the same product: the region's extension starts at the input
        else:
            Z = a @ net.W[h].T
            if net.b[h] is not None:
                Z = Z + net.b[h]
        cost = pricing.costs(Z, sens[h], kappa, gamma, burden)
        if fixed.any():  # a neuron a fixed sample fires on (within the margin) can be owned by no one
            cost[:, (Z[fixed] > -gamma * kappa).any(0)] = np.inf
            cost[fixed] = np.inf
        if h == net.depth - 1:
            eff = effective_mask(net, np.maximum(Z, 0), labels)
            cost = np.where(eff, cost, np.inf)
        T, price = pricing.assign(cost, k_per_layer[h])
        P = (Z > 0).astype(np.float64)
        for m in range(M):
            for j in T[m]:
                if j >= 0:
                    P[:, j] = 0.0
                    P[m, j] = 1.0
        targets.append(T)
        patterns.append(P)
        costs.append(price)
        a = P * Z  # the linear extension of the region the targets force
    return Assignment(tuple(targets), tuple(patterns), tuple(costs))


def retarget(
    net: HeadArrays,
    x: np.ndarray,
    label: int,
    others: list[np.ndarray],
    used: list[np.ndarray],
    k_per_layer: list[int],
    kappa: float,
    *,
    gamma: float = 2.0,
    banned: list[set[int]] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """New targets for one sample while every other sample stays where it is (repair, Step D).

    ``others[h]`` are the other samples' current pre-activations (n x d_h); a neuron is eligible only
    if all of them are below ``-gamma*kappa`` on it, it is not ``used`` by another sample's target, and
    not ``banned`` for this sample. Returns (targets per layer, intended pattern per layer).
    """
    Zs = net.preacts(x[None, :])
    sens = sensitivities(net, [(z[0] > 0).astype(np.float64) for z in Zs])
    a = x[None, :]
    targets, patterns = [], []
    for h in range(net.depth):
        z = a @ net.W[h].T
        if net.b[h] is not None:
            z = z + net.b[h]
        z = z[0]
        ok = ~used[h]
        if others[h].shape[0]:
            ok &= (others[h] <= -gamma * kappa).all(0)
        if banned is not None:
            ok[list(banned[h])] = False
        if h == net.depth - 1:
            ok &= effective_mask(net, np.maximum(z, 0)[None, :], np.array([label]))[0]
        cost = np.where(ok, (gamma * kappa - z) / np.maximum(sens[h], 1e-12), np.inf)
        order = np.argsort(cost)[: k_per_layer[h]]
        T = np.array([j if np.isfinite(cost[j]) else -1 for j in order], dtype=np.int64)
        P = (z > 0).astype(np.float64)
        P[used[h]] = 0.0
        P[T[T >= 0]] = 1.0
        targets.append(T)
        patterns.append(P)
        a = (P * z)[None, :]
    return targets, patterns
