"""Step 1 of the certificate: how each rebuilt sample explains its witness rows (docs/attacks.md,
"The certificate").

The rebuilt input's gradient is recomputed in float64; on every row it claims as its own (its *witnesses*) the
observed gradient must equal ``s_k`` times it, within that row's float32 noise; ``s_k`` is the sample's scale
(``1/M`` for a mean-loss gradient of ``M`` samples, times ``min(1, C/||g_k||)`` under per-sample clipping to
norm ``C``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedleak.nets import Trace, forward_trace

F64 = torch.float64


# -------------------------------------------------------------------------------------------------------
# Per-sample gradient pieces


def backward_signals(W: list[torch.Tensor], pres: list[torch.Tensor], e: torch.Tensor) -> list[torch.Tensor]:
    """Backward signals of every hidden layer for loss vectors ``e`` (rows), given the pre-activations."""
    deltas, d = [], e
    for w, z in zip(reversed(W[1:]), reversed(pres)):
        d = (d @ w) * (z > 0).to(d.dtype)
        deltas.append(d)
    return deltas[::-1]


def witness_vectors(
    acts: list[torch.Tensor], deltas: list[torch.Tensor], e: torch.Tensor, layer: int, rows: list[int],
    has_bias: bool, top: bool,
) -> torch.Tensor:
    """Per-sample predicted gradient entries of ``rows`` of dense layer ``layer`` (one sample):
    the weight row, the bias entry and, for the top layer, the output layer's column."""
    parts = [deltas[layer][rows, None] * acts[layer][None, :]]
    if has_bias:
        parts.append(deltas[layer][rows, None])
    if top:
        parts.append(acts[layer + 1][rows, None] * e[None, :])
    return torch.cat(parts, dim=1)


def observed_vectors(G, g, layer: int, rows: list[int], top: bool) -> torch.Tensor:
    """The observed entries matching :func:`witness_vectors` (``G``/``g``: weight and bias gradients)."""
    parts = [G[layer][rows]]
    if g[layer] is not None:
        parts.append(g[layer][rows, None])
    if top:
        parts.append(G[-1][:, rows].T)
    return torch.cat(parts, dim=1)


def per_sample_norms(trace: Trace, has_bias: list[bool]) -> torch.Tensor:
    """The norm of each sample's own (unscaled) gradient over all layers, from its trace."""
    sq = torch.zeros(trace.logits.shape[0], dtype=F64, device=trace.logits.device)
    signals = list(trace.deltas) + [trace.loss_vectors]
    for i, d in enumerate(signals):
        inp = (trace.activations[i] ** 2).sum(1) + (1.0 if has_bias[i] else 0.0)
        sq += (d**2).sum(1) * inp
    return sq.sqrt()


# -------------------------------------------------------------------------------------------------------
# Step 1: witnesses of one sample


@dataclass(frozen=True)
class WitnessFit:
    """How one rebuilt sample explains its witness rows: ``scale`` (observed / recomputed), the fitted
    label-entry correction ``eps``, the worst relative ``residual`` of a passing row, passing witnesses per
    layer (``counts``), rows dropped as too noisy, whether the input reproduces its known activations, and the
    passing rows themselves as ``(layer, row, absolute tolerance)``. ``scale_tol`` is how far the scale may
    sit from the batch's: the fit's own precision, ``noise_factor`` times the median row noise over the square
    root of the number of passing rows, at most ``opts.scale_tol``."""

    scale: float
    eps: float
    residual: float
    counts: tuple[int, ...]
    noisy_rows: int
    consistent: bool
    passing: tuple[tuple[int, int, float], ...] = ()
    scale_tol: float = float("nan")


def fit_witnesses(attack, complete: list, t64: Trace, d_one: list[torch.Tensor]) -> list[WitnessFit]:
    """Fit each complete candidate's witness rows (see :class:`WitnessFit`).

    The model for a witness's observed entries is ``s * (p0 + eps * p1)``: ``p0`` is the recomputed
    per-sample gradient (float64) and ``p1`` its derivative with respect to the label entry of the loss
    vector, whose float32 value ``p_y - 1`` the client computes with cancellation. ``s`` and ``eps`` are fitted
    jointly over all witnesses of the sample; ``|eps|`` must stay within float32 rounding and every witness
    must then match within its own noise level: the float32 noise of its recomputation, plus the update's
    own rounding noise where the update is known to carry more (a weight delta ``before - after``).
    """
    net, opts = attack.net, attack.opts
    X = torch.stack([c.acts[0] for c in complete])
    y = torch.tensor([c.label for c in complete], device=X.device)
    K = net.num_classes
    t32 = forward_trace(net, X.to(attack.obs_dtype), y, dtype=attack.obs_dtype)
    eps32 = float(torch.finfo(attack.obs_dtype).eps)
    onehot = torch.nn.functional.one_hot(y, K).to(F64)
    # float32 noise without the label-entry cancellation (that part is fitted): exact e_y, float32 rest
    e32 = t32.loss_vectors.clone()
    rows_k = torch.arange(len(y), device=X.device)
    e32[rows_k, y] = t64.loss_vectors[rows_k, y].to(attack.obs_dtype)
    d32 = backward_signals(attack.W_obs, t32.preactivations, e32)
    eps_bound = opts.label_eps_ulps * eps32
    fits: list[WitnessFit] = []
    for k, c in enumerate(complete):
        acts64 = [a[k] for a in t64.activations]
        acts32 = [a[k].to(F64) for a in t32.activations]
        consistent = all(
            float((acts64[i] - c.acts[i]).norm()) <= opts.forward_tol * float(acts64[i].norm().clamp_min(1e-300))
            for i in c.acts
        )
        obs, p0, p1, noise, layer_of, row_of, norm_of = [], [], [], [], [], [], []
        for i, rows in c.witnesses.items():
            rows = rows[: opts.max_witnesses]  # the strongest rows come first
            top = i == net.depth - 1
            has_bias = attack.g[i] is not None
            o = observed_vectors(attack.G, attack.g, i, rows, top)
            a0 = witness_vectors(acts64, [d[k] for d in t64.deltas], t64.loss_vectors[k], i, rows, has_bias, top)
            a1 = witness_vectors(acts64, [d[k] for d in d_one], onehot[k], i, rows, has_bias, top)
            a32 = witness_vectors(acts32, [d[k].to(F64) for d in d32], e32[k].to(F64), i, rows, has_bias, top)
            scale = o.norm(dim=1, keepdim=True).clamp_min(1e-300)  # each witness weighs the same
            obs.append(o / scale)
            p0.append(a0 / scale)
            p1.append(a1 / scale)
            row_noise = (a32 - a0).norm(dim=1) / a0.norm(dim=1).clamp_min(1e-300) + 8 * eps32
            if attack.noise is not None:  # the update's own rounding, relative to the row
                row_noise = row_noise + observed_vectors(attack.noise, attack.noise_b, i, rows, top).norm(dim=1) / scale[:, 0]
            noise.append(row_noise)
            layer_of.extend([i] * len(rows))
            row_of.extend(rows)
            norm_of.append(scale[:, 0])
        noise_t = torch.cat(noise)
        layer_t = torch.tensor(layer_of, device=X.device)
        tol = torch.maximum(torch.full_like(noise_t, opts.check_tol), opts.noise_factor * noise_t)
        quiet = noise_t <= opts.max_noise
        ok = quiet.clone()
        s_fit, eps_fit, res = float("nan"), float("nan"), torch.full_like(noise_t, float("inf"))
        for _ in range(3):  # fit on the rows that pass, re-test all rows
            if not bool(ok.any()):
                break
            # least squares in (s, t = s * eps) through its 2x2 normal equations
            parts = torch.split(ok, [len(o) for o in obs])
            gram = torch.zeros(2, 2, dtype=F64, device=X.device)
            rhs = torch.zeros(2, dtype=F64, device=X.device)
            for o, a0, a1, m in zip(obs, p0, p1, parts):
                o, a0, a1 = o[m], a0[m], a1[m]
                gram += torch.stack([torch.stack([(a0 * a0).sum(), (a0 * a1).sum()]),
                                     torch.stack([(a0 * a1).sum(), (a1 * a1).sum()])])
                rhs += torch.stack([(a0 * o).sum(), (a1 * o).sum()])
            coef = torch.linalg.lstsq(gram.cpu(), rhs[:, None].cpu()).solution[:, 0]  # CPU: rank-revealing driver
            s_fit, t_fit = float(coef[0]), float(coef[1])
            eps_fit = t_fit / s_fit if s_fit != 0 else float("inf")
            if not abs(eps_fit) <= eps_bound:  # the best correction allowed: at the bound, refit the scale
                eps_fit = math.copysign(eps_bound, eps_fit) if math.isfinite(eps_fit) else 0.0
                cc = gram[0, 0] + 2 * eps_fit * gram[0, 1] + eps_fit**2 * gram[1, 1]
                s_fit = float((rhs[0] + eps_fit * rhs[1]) / cc.clamp_min(1e-300))
                t_fit = s_fit * eps_fit
            res = torch.cat([(o - s_fit * a0 - t_fit * a1).norm(dim=1) for o, a0, a1 in zip(obs, p0, p1)])
            new_ok = (res <= tol) & quiet
            if torch.equal(new_ok, ok):
                break
            ok = new_ok
        counts = tuple(int((ok & (layer_t == i)).sum()) for i in range(net.depth))
        worst = float(res[ok].max()) if bool(ok.any()) else float("inf")
        abs_tol = tol * torch.cat(norm_of)
        passing = tuple((layer_of[r], row_of[r], float(abs_tol[r])) for r in torch.nonzero(ok).flatten().tolist())
        n_ok = int(ok.sum())
        precision = opts.noise_factor * float(noise_t[ok].median()) / math.sqrt(n_ok) if n_ok else opts.scale_tol
        fits.append(WitnessFit(s_fit, eps_fit, worst, counts, int((~quiet).sum()), consistent, passing,
                               min(opts.scale_tol, precision)))
    return fits


def input_uncertainty(attack, fit: WitnessFit, x: torch.Tensor) -> float:
    """How far the update's own rounding can have moved a rebuilt input (max abs, 5 standard deviations), where
    that rounding is known and larger than the gradient's float32 noise: a weight delta, whose ``after`` the
    client rounded to one ulp. The input is the ratio of weight row and bias entry of its witness rows at the
    first layer, ``G_j / g_j``; a rounding error uniform within one ulp of ``after`` moves it by up to
    ``(nu_G + |x| nu_g) / |g_j|`` per entry, with standard deviation ``1/sqrt(12)`` of that, averaged over the
    rows; plus how far the input is from its witnesses' own ratio. Zero when the noise is not known (a
    gradient) or the first layer has no bias."""
    if attack.noise is None or attack.g[0] is None:
        return 0.0
    rows = [row for layer, row, _ in fit.passing if layer == 0]
    if not rows:
        return 0.0
    g = attack.g[0][rows]
    per_row = (attack.noise[0][rows] + x.abs()[None, :] * attack.noise_b[0][rows, None]) / g.abs()[:, None].clamp_min(
        1e-300) / math.sqrt(12)
    spread = float(5 * (per_row.pow(2).sum(0).sqrt() / len(rows)).max())
    # the input itself may rest on more (and weaker) rows than its witnesses: it must agree with the witnesses'
    # own ratio (weighted by g^2, the inverse of each ratio's variance) within that spread too
    weights = g * g
    ratio = (attack.G[0][rows] / g[:, None] * weights[:, None]).sum(0) / weights.sum()
    return spread + float((x - ratio).abs().max())
