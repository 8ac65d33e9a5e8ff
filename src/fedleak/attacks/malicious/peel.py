"""Peeling: the samples a trap-weight update holds only in rows it shares with samples already read (see
:mod:`fedleak.attacks.malicious.proofs`, whose whole-batch proof they complete)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.attacks.exact.grouping import group_rows
from fedleak.nets import ReluMLP, forward_trace

LIVE = 1e-3  # a row's bias entry left after subtraction counts when above this fraction of the layer's largest


@dataclass(frozen=True)
class FirstLayer:
    """The update's first-layer rows as read (weights ``G``, biases ``g``) and a bound on each row's rounding."""

    G: torch.Tensor
    g: torch.Tensor
    noise: torch.Tensor


def contributions(net: ReluMLP, X: torch.Tensor, labels: list[int], scale: float,
                  focal_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-layer weight and bias gradients that samples ``X`` with ``labels`` add to an update of ``scale``
    (of a focal loss's, with ``focal_gamma``)."""
    t = forward_trace(net, X, torch.as_tensor(labels, device=X.device), focal_gamma=focal_gamma)
    d = scale * t.deltas[0]  # n x width: each sample's bias gradient, zero where its neuron is shut
    return d.T @ X, d.sum(0)


def peel(net: ReluMLP, layer: FirstLayer, X: torch.Tensor, labels: list[int], scale: float, limit: int,
         group_tol: float, fit_tol: float, focal_gamma: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """``X`` and ``labels`` with the samples peeled off the update: the known samples' recomputed gradients are
    subtracted from every first-layer row, and a row then left with one sample's gradient reads it as ``dW/db``.
    Rows that agree (within ``group_tol``) are one candidate, kept when it opens them and one label's recomputed
    bias entries explain them at ``scale`` (within ``fit_tol``). Repeats until ``limit`` samples are known or
    nothing new is read. A peeled input carries the error of every sample subtracted before it: it is a step of
    the whole-batch proof, not a certificate of its own."""
    X, labels = X.clone(), list(labels)
    while 0 < len(labels) < limit:
        G_hat, g_hat = contributions(net, X, labels, scale, focal_gamma)
        RG, Rg = layer.G - G_hat, layer.g - g_hat
        live = torch.nonzero(Rg.abs() > LIVE * float(layer.g.abs().max())).flatten()
        if len(live) == 0:
            break
        groups = group_rows(RG[live] / Rg[live, None], torch.argsort(-Rg[live].abs()), group_tol)
        rows = [live[grp.rows] for grp in groups]
        cand = torch.stack([RG[r].sum(0) / Rg[r].sum() for r in rows])
        found: list[tuple[torch.Tensor, int]] = []
        for y in range(net.num_classes):
            t = forward_trace(net, cand, torch.full((len(rows),), y, dtype=torch.long, device=X.device),
                              focal_gamma=focal_gamma)
            for k, r in enumerate(rows):
                fits = float((scale * t.deltas[0][k, r] - Rg[r]).norm()) <= fit_tol * float(Rg[r].norm())
                if fits and bool((t.preactivations[0][k, r] > 0).all()):
                    found.append((cand[k], y))
        added = 0
        for x, y in found:
            norms = X.norm(dim=1)
            if len(labels) < limit and bool(((X - x).norm(dim=1) > 10 * group_tol * norms).all()):
                X, labels, added = torch.cat([X, x[None]]), labels + [y], added + 1
        if not added:
            break
    return X, labels
