"""Trap weights ("When the Curious Abandon Honesty", Boenisch et al., EuroS&P 2023): the server-side change of
the first layer, and the ``"trap-weights"`` attack that reads it (see :mod:`fedleak.attacks.malicious`)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from fedleak.attacks.exact.grouping import group_rows
from fedleak.attacks.malicious.certify import (
    Candidates,
    MaliciousOptions,
    certify_candidates,
    finish,
    resolve_options,
    with_sign_read,
)
from fedleak.attacks.malicious.peel import FirstLayer
from fedleak.attacks.malicious.read_layer import first_layer, first_two_dense, ratio_bound
from fedleak.attacks.malicious.scale_vote import own_scale, without_unpinned_blends
from fedleak.attacks.masked_input import first_reader, input_masking
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError
from fedleak.model_copy import copy_model
from fedleak.reconstruction import Reconstruction
from fedleak.weight_change import either_sign

F64 = torch.float64


def trap_weights(model: nn.Module, seed: int = 0, *, sigma: float | None = None, scale: float = 0.95,
                 bias: float = 0.0, inplace: bool = False) -> nn.Module:
    """Return ``model`` with trap weights in its first ``nn.Linear`` layer (same architecture).

    Each row: a random half of the entries is ``-|N(0, sigma^2)|``, the other half ``scale`` times the
    magnitudes of the first half (so the row sums to ``(scale-1)`` times the negative mass), bias
    ``bias``. With ``scale < 1`` the neurons rarely fire on non-negative inputs (Boenisch et al.;
    breaching uses sigma 0.5, scale 0.95). With bias 0 which neurons fire does not depend on sigma, so
    the default ``sigma = 0.1/sqrt(in_features)`` (a tenth of PyTorch's init scale) keeps the rounding
    error of a one-step float32 weight delta small: ``before - after`` cancels, and large weights would
    drown the rows in noise. Copied unless ``inplace``.
    """
    if not 0 < scale <= 1:
        raise FedleakError(f"trap-weight scale must lie in (0, 1], got {scale}")
    model = model if inplace else copy_model(model)
    _, first, _ = first_two_dense(model)
    out_f, in_f = first.weight.shape
    sigma = 0.1 / math.sqrt(in_f) if sigma is None else float(sigma)
    if sigma <= 0:
        raise FedleakError(f"trap-weight sigma must be positive, got {sigma}")
    gen = torch.Generator().manual_seed(int(seed))
    half = in_f // 2
    W = torch.zeros(out_f, in_f, dtype=F64)
    for i in range(out_f):
        perm = torch.randperm(in_f, generator=gen)
        mags = torch.randn(half, generator=gen, dtype=F64).abs() * sigma
        W[i, perm[:half]] = -mags
        W[i, perm[half : 2 * half]] = scale * mags[torch.randperm(half, generator=gen)]
    with torch.no_grad():
        first.weight.copy_(W.to(first.weight.dtype))
        first.bias.fill_(float(bias))
    return model


@register_attack("trap-weights", update_kinds=("gradient", "weights"), needs_relu_network=True,
                 description="malicious trap-weight first layer (Boenisch et al.): certified x = dW_i/db_i")
def trap_weights_attack(model: nn.Module, update, *, input_shape: tuple[int, ...] | None = None,
                        options: MaliciousOptions | None = None, **overrides) -> Reconstruction:
    """Rebuild the samples that alone open a first-layer neuron of a trap-weight model.

    ``model`` is the model the server sent (e.g. from :func:`trap_weights`); ``update`` a gradient or a
    one-step weight update. Rows whose implied inputs ``dW_i/db_i`` coincide are grouped (leaders are
    the rows with the largest bias gradient, the least affected by rounding); a group's estimate is
    ``sum dW_i / sum db_i``; each group is certified as described in :mod:`fedleak.attacks.malicious`.
    ``input_shape`` (one sample) defaults to what :func:`fedleak.nets.as_network` finds. A change whose sign was not
    read (two or three classes) is tried with the other sign where this one certifies nothing
    (:func:`~fedleak.weight_change.either_sign`).
    """
    opts = resolve_options(options, overrides)
    return either_sign(lambda u: _trapped(model, u, input_shape, opts), update)


def _trapped(model: nn.Module, update, input_shape: tuple[int, ...] | None, opts: MaliciousOptions
             ) -> Reconstruction:
    """:func:`trap_weights_attack` on ``update`` as it is."""
    start = time.perf_counter()
    net, G, g, n_examples, (nG, ng), G_next = first_layer(model, update, "trap-weight", input_shape)
    usable = torch.nonzero(g.abs() > opts.min_bias * float(g.abs().max().clamp_min(1e-300))).flatten()
    R = G[usable] / g[usable, None]
    groups = group_rows(R, torch.argsort(-g[usable].abs()), opts.group_tol)  # strongest rows lead
    rows = [usable[grp.rows].tolist() for grp in groups]
    X = (torch.stack([G[r].sum(0) / g[r].sum() for r in rows]) if rows
         else torch.empty(0, G.shape[1], dtype=F64, device=G.device))
    den = torch.stack([g[r].sum() for r in rows]) if rows else torch.empty(0, dtype=F64, device=G.device)
    bound = ratio_bound(X, torch.stack([nG[r].square().sum().sqrt() for r in rows]) if rows else den,
                        torch.stack([ng[r].square().sum().sqrt() for r in rows]) if rows else den, den)
    layer = FirstLayer(G, g, torch.maximum(nG, ng))
    cands = Candidates(X, rows, [g[r] for r in rows], [[] for _ in rows], [G_next[:, r].T for r in rows], bound,
                       alone=True, layer=layer)
    verdicts, batch_scale = certify_candidates(net.head, cands, n_examples, opts) if rows else ([], None)
    notes = (["no first-layer row of the update moved: no trap neuron was opened by a sample"] if not rows else
             [] if batch_scale is not None else ["no common scale: no candidate could be certified"])
    masking = input_masking(model, first_reader(net), net.input_shape)  # (:mod:`fedleak.attacks.masked_input`)
    rec = finish(net, "trap-weights", cands, verdicts, n_examples, opts, start, notes, masking)
    rec = without_unpinned_blends(rec, batch_scale, own_scale(update), opts.scale is not None or opts.known_scale,
                                  opts.scale_tol, net.num_classes)
    return with_sign_read(model, update, opts, rec)

