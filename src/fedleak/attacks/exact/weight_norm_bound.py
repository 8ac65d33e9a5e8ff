"""The rounding bound of a weight's gradient rebuilt from weight normalisation's ``g`` and ``v`` gradients.

:mod:`fedleak.nets.weight_norm` rebuilds ``G_r = (N_r / g_r) dL/dv_r + (dL/dg_r) u_r`` for each slice ``r`` (``n``
values). The client computed ``dL/dg_r = S_r / N'_r`` and ``dL/dv_r = (g_r / N'_r) (G_r - v_r S_r / N'_r^2)`` in its
dtype (``u = eps / 2`` its unit roundoff) from its float gradient ``G`` (off by up to ``4 eps |G|``, the exact attack's
model of a gradient's own rounding), with ``S_r = v_r . G_r`` and its own norm ``N'_r``. Those two are sums of ``n``
terms, modelled as torch computes them on a CPU or a GPU, by vectorised or tree reductions: each term goes through at
most ``d = n / 8 + 4`` roundings, so ``S_r`` is off by at most ``d u sum_k |v_rk| |G_rk|`` and ``N'_r`` by
``theta = (d / 2 + 2) u`` relative (a plain loop, ``n`` roundings deep, is not covered). Carried through the rebuild,
each entry is off by at most::

    (12.5 eps + theta) |G_rj| + (2 d u + 2 theta + 8 eps) T_rj,   T_rj = |u_rj| sum_k |u_rk| |G_rk|

(``4.5 eps``: the gradient's own rounding and the rebuilt value's, rounded once to its dtype; ``8 eps``: the
handful of products and quotients on the way), plus the update's own noise on ``dL/dv`` and ``dL/dg`` carried
through the rebuild (a one-step change's rounding, a transport error): ``(N_r / |g_r|) e(dv_rj) + |u_rj| e(dg_r)``.
The bound is read from the rebuilt ``G`` (its own error is a tiny share of it, covered by a factor of 1.01).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.nets.dense_norms import FoldedModel

F64 = torch.float64

# a share of the bound that covers its reading from the rebuilt gradient rather than the client's
READ_MARGIN = 1.01


def weight_norm_bounds(fold: FoldedModel, rebuilt: Mapping[str, torch.Tensor],
                       noise: Mapping[str, RoundingNoise] | None, error: float = 0.0) -> dict[str, RoundingNoise]:
    """The bound of each weight ``fold`` rebuilt from weight normalisation (``rebuilt``: the twin's update), keyed by
    its name: the client's arithmetic, plus the update's own ``noise`` on ``g`` and ``v`` (keyed by their names; None
    for a gradient) or a known transport ``error`` per entry."""
    out = {}
    for f in fold.weight_norms:
        if f.weight not in rebuilt:  # a frozen layer: nothing rebuilt
            continue
        G = rebuilt[f.weight]
        gain, u, _ = (t.to(G.device) for t in f.factors(fold.source))
        eps = float(torch.finfo(G.dtype).eps)
        unit, depth = eps / 2, u.shape[1] / 8 + 4
        theta = (depth / 2 + 2) * unit
        a = u.abs()
        plus = a * (a * f.rows(G).to(F64).abs()).sum(dim=1, keepdim=True)
        plus.mul_(2 * depth * unit + 2 * theta + 8 * eps)
        if noise is not None:
            plus.add_(gain.abs()[:, None] * f.rows(noise[f.v].read())).add_(a * noise[f.g].read().reshape(-1)[:, None])
        elif error:
            plus.add_((gain.abs()[:, None] + a) * error)
        plus = f.unrows(plus.mul_(READ_MARGIN * (1 + eps)), G.shape).to(G.dtype)
        out[f.weight] = RoundingNoise(G.detach(), READ_MARGIN * (12.5 * eps + theta), plus=plus, plus_scale=1.0)
    return out


def loose_bounds(fold: FoldedModel, bounds: Mapping[str, RoundingNoise], max_noise: float) -> str:
    """Why no sample is certified through a rebuilt weight whose bound, relative to its entries, exceeds
    ``max_noise`` (slices of many values: ``dim=None`` normalises the whole tensor as one); empty where none does."""
    loose = [(f, bounds[f.weight].scale) for f in fold.weight_norms
             if f.weight in bounds and bounds[f.weight].scale > max_noise]
    return "; ".join(
        f"{f.describe()} over slices of {f.rows(fold.source.get_parameter(f.v)).shape[1]:,} values"
        f"{' (dim=None: the whole tensor)' if f.dim == -1 else ''} leaves the rebuilt gradient's rounding bound at "
        f"{scale:.1e} of its entries, above max_noise ({max_noise:g}): no sample is certified through it "
        "(normalise each output unit, dim=0, weight_norm's default)" for f, scale in loose)


def decay_directions(fold: FoldedModel, before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What SGD's weight decay adds to each tensor of the twin's one-step change, up to its factor ``lr * lambda``:
    the tensor itself before the step (``before``, by name), and, for a weight rebuilt from weight normalisation, its
    :meth:`~fedleak.nets.weight_norm.WeightNormFold.decay_direction` (``fold``'s model is at the weights before the
    step)."""
    return dict(before) | {f.weight: f.decay_direction(fold.source) for f in fold.weight_norms}
