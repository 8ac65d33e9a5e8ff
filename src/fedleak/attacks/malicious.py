"""Malicious-server attacks that change only the *weights* the server sends (algorithms spec §6).

* **Trap weights** ("When the Curious Abandon Honesty", Boenisch et al., EuroS&P 2023):
  :func:`trap_weights` re-initialises the first ``nn.Linear`` layer so that every row has half of its
  entries ``-|N(0, sigma^2)|`` and the other half ``scale`` times those magnitudes, bias 0. On
  non-negative inputs neurons then fire rarely, many fire for one sample only, and for such a neuron
  ``x = dW_i / db_i`` exactly. The ``"trap-weights"`` attack reads these rows.
* **Imprint bins** ("Robbing the Fed", Fowl et al., ICLR 2022) inside the *same* architecture:
  :func:`imprint_weights` sets ``bins`` first-layer rows to one linear measurement ``h(x) = a . x``
  (pixel mean or a random projection) with biases at the negatives of quantiles of ``h`` over public
  data, and makes the next layer's columns of those rows identical, so a sample's back-propagated signal
  is the same on every bin it opens. A sample alone between two consecutive thresholds is then
  ``(dW_i - dW_{i+1}) / (db_i - db_{i+1})``. The ``"imprint"`` attack reads these differences.

Both attacks run on a FedSGD gradient or on a weight update whose scale is unknown (one local SGD step:
``before - after = lr * gradient``); they use only the update, the model the server sent and
``num_examples``. Each candidate is **certified** before it counts: the candidate is pushed through the
whole network (float64), its first-layer gradient is recomputed for every possible label, and it is
kept only when (a) every neuron it claims fires for it, (b) for one label the recomputed gradient
explains the observed bias entries it claims (all of them, at one scale) and (c) that scale is the
batch's common scale (``lr/M``, or ``1/M`` for a mean-loss gradient), found as the value most candidates
agree on. A mixture of several samples fails (c): its entries are sums of several samples' gradients.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedleak.analysis.forward import forward_trace
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError, UpdateError
from fedleak.models.structure import ReluMLP, as_relu_mlp
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import GradientUpdate, WeightUpdate, check_matches_model
from fedleak.validation import validate_fields

F64 = torch.float64


# -------------------------------------------------------------------------------------------------------
# Server-side model modifications


def _first_two_dense(model: nn.Module) -> tuple[ReluMLP, nn.Linear, nn.Linear]:
    net = as_relu_mlp(model)
    if net.depth == 0:
        raise ModelError("a malicious first layer needs at least one hidden ReLU layer")
    first = net.dense[0].module
    if first.bias is None:
        raise ModelError(f"layer '{net.dense[0].name}' has no bias; trap and imprint weights need one")
    return net, first, net.dense[1].module


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
    model = model if inplace else copy.deepcopy(model)
    _, first, _ = _first_two_dense(model)
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


def _measurement(kind: str, dim: int, seed: int) -> torch.Tensor:
    if kind == "mean":
        return torch.full((dim,), 1.0 / dim, dtype=F64)
    if kind == "random":
        gen = torch.Generator().manual_seed(int(seed))
        a = torch.randn(dim, generator=gen, dtype=F64)
        return a / a.norm()
    raise FedleakError(f"unknown imprint measurement '{kind}'; use 'mean' or 'random'")


def imprint_weights(model: nn.Module, data_for_quantiles: torch.Tensor, bins: int | None = None, *,
                    measurement: str = "random", seed: int = 0, column_scale: float = 0.01,
                    weight_scale: float = 0.01, inplace: bool = False) -> nn.Module:
    """Return ``model`` with a "Robbing the Fed" imprint in its first layer (same architecture).

    The first ``bins`` rows (default: all rows of the first layer) are set to the measurement ``a``
    (``"mean"``: pixel mean, ``"random"``: a seeded unit random projection), the biases to ``-c_i`` with
    ``c_i`` the ``i/bins`` quantiles of ``h(x) = a . x`` over ``data_for_quantiles`` (public or held-out
    data, never the clients'; ``c_0`` lies below all of it). The next layer's columns of these rows are
    set to one shared column (``column_scale`` times a seeded normal vector), so that a sample's signal
    is identical on every bin it opens. Rows and biases are multiplied by ``weight_scale`` (which
    neurons fire does not change): small first-layer values keep a one-step float32 weight delta
    ``before - after`` free of cancellation error. The model is copied unless ``inplace``.
    """
    if weight_scale <= 0:
        raise FedleakError(f"imprint weight_scale must be positive, got {weight_scale}")
    model = model if inplace else copy.deepcopy(model)
    net, first, second = _first_two_dense(model)
    width = first.out_features
    bins = width if bins is None else int(bins)
    if not 2 <= bins <= width:
        raise FedleakError(f"imprint bins must lie in [2, {width}] (the first layer's width), got {bins}")
    pub = torch.as_tensor(data_for_quantiles).reshape(len(data_for_quantiles), -1).to(F64)
    if pub.shape[1] != first.in_features:
        raise FedleakError(
            f"data_for_quantiles has {pub.shape[1]} values per sample; the first layer takes {first.in_features}"
        )
    if pub.shape[0] < 2:
        raise FedleakError("imprint quantiles need at least 2 public samples")
    a = _measurement(measurement, first.in_features, seed)
    h = pub @ a
    levels = torch.arange(bins, dtype=F64) / bins
    c = torch.quantile(h, levels)
    spread = float(h.max() - h.min()) or 1.0
    c[0] = float(h.min()) - spread  # the first bin opens for every sample
    c = torch.cummax(c, 0).values
    gen = torch.Generator().manual_seed(int(seed) + 1)
    col = torch.randn(second.out_features, generator=gen, dtype=F64) * column_scale
    with torch.no_grad():
        first.weight[:bins] = (weight_scale * a).to(first.weight.dtype)
        first.bias[:bins] = (-weight_scale * c).to(first.bias.dtype)
        second.weight[:, :bins] = col.to(second.weight.dtype)[:, None]
    return model


# -------------------------------------------------------------------------------------------------------
# Shared certification


@dataclass(frozen=True)
class MaliciousOptions:
    """Tolerances of the trap-weight and imprint attacks (relative).

    ``group_tol``: rows whose implied inputs agree this closely (relative L2) are one sample.
    ``fit_tol``: the recomputed bias gradient must explain a candidate's observed entries this closely.
    ``scale_tol``: a candidate's fitted scale must equal the batch's common scale this closely.
    ``merge_tol``: certified candidates of one label closer than this are one sample (noisy copies).
    ``min_rows``: witness rows a candidate needs (1: the scale certificate alone).
    ``min_bias``: rows whose bias gradient is below this fraction of the largest are ignored (noise).
    ``exact_tol``: a candidate is certified only if the rounding error that the update's float storage
    puts on it (estimated from the sent and returned weights: half an ulp of each) is below this, so
    that "certified" means exact.
    ``known_scale``: the update is a mean-loss gradient, whose common scale is ``1/num_examples``.
    ``scale``: the common scale if the server knows it (e.g. ``lr / num_examples`` when it dictates the
    learning rate); by default it is the value most candidates agree on, and it counts only when at
    least ``min_support`` candidates agree on it (one candidate always agrees with itself).
    """

    group_tol: float = 1e-3
    fit_tol: float = 1e-3
    scale_tol: float = 1e-4
    merge_tol: float = 1e-2
    exact_tol: float = 1e-4
    min_rows: int = 1
    min_bias: float = 1e-6
    known_scale: bool = False
    scale: float | None = None
    min_support: int = 2

    def __post_init__(self) -> None:
        validate_fields(self)


def _options(options: MaliciousOptions | None, overrides: dict) -> MaliciousOptions:
    opts = options or MaliciousOptions()
    if overrides:
        unknown = set(overrides) - set(MaliciousOptions.__dataclass_fields__)
        if unknown:
            raise FedleakError(f"unknown option(s) for this attack: {sorted(unknown)}")
        opts = MaliciousOptions(**{**opts.__dict__, **overrides})
    return opts


def _as_delta(model: nn.Module, update) -> tuple[dict[str, torch.Tensor], int | None, dict[str, torch.Tensor]]:
    """The update as a gradient-like map (a WeightUpdate gives ``before - after``), num_examples, and
    a bound on each entry's rounding error (half an ulp of each operand, or of the gradient)."""
    if isinstance(update, WeightUpdate):
        grads, n = update.delta(), update.num_examples
        noise = {k: (_ulp(update.before[k]) ** 2 + _ulp(update.after[k]) ** 2).sqrt() for k in grads}
    elif isinstance(update, GradientUpdate):
        grads, n = dict(update.gradients), update.num_examples
        noise = {k: 8 * _ulp(v) for k, v in grads.items()}  # the float sum over the batch
    elif isinstance(update, Mapping):
        grads, n = dict(GradientUpdate(update).gradients), None
        noise = {k: 8 * _ulp(v) for k, v in grads.items()}
    else:
        raise UpdateError(f"an update must be a GradientUpdate, a WeightUpdate or a dict; got {type(update).__name__}")
    check_matches_model(model, grads, "update")
    return grads, n, noise


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Half a unit in the last place: the rounding error of storing ``t``."""
    return t.detach().abs().to(F64) * (0.5 * float(torch.finfo(t.dtype).eps))


def _group(R: torch.Tensor, weight: torch.Tensor, tol: float) -> list[list[int]]:
    """Leader clustering of the rows of ``R`` (relative L2 ``tol``), leaders taken by decreasing ``weight``."""
    n = R.shape[0]
    if n == 0:
        return []
    norms = R.norm(dim=1).clamp_min(1e-300)
    order = torch.argsort(-weight)
    close = torch.cdist(R, R) <= tol * norms[:, None]
    assigned = torch.zeros(n, dtype=torch.bool)
    groups: list[list[int]] = []
    for i in order.tolist():
        if assigned[i]:
            continue
        members = close[i] & ~assigned
        assigned |= members
        groups.append(torch.nonzero(members).flatten().tolist())
    return groups


def _mode_scale(fits: np.ndarray, ok: np.ndarray, tol: float) -> tuple[float | None, int]:
    """The scale most candidates agree on (each candidate offers its ``fits[k, y]`` where ``ok``)."""
    ks, ys = np.nonzero(ok & (fits > 0))
    if len(ks) == 0:
        return None, 0
    logs = np.log(fits[ks, ys])
    order = np.argsort(logs)
    logs, ks = logs[order], ks[order]
    width = math.log1p(tol)
    best, best_at, hi = 0, None, 0
    for lo in range(len(logs)):
        while hi < len(logs) and logs[hi] - logs[lo] <= width:
            hi += 1
        count = len(np.unique(ks[lo:hi]))
        if count > best:
            best, best_at = count, float(np.median(logs[lo:hi]))
    return (math.exp(best_at) if best_at is not None else None), best


@dataclass
class _Cands:
    """Candidates: ``X`` (n x D), the first-layer rows each claims, its observed bias entries there,
    and neurons that must stay silent for it (imprint: the next bin). ``cols`` (trap weights): the
    observed next-layer weight-gradient columns of its rows (|rows| x d2), which for a neuron only this
    sample opens are ``scale * delta_next * h_i``: a K- or d2-dimensional check per row."""

    X: torch.Tensor
    rows: list[list[int]]
    obs: list[torch.Tensor]
    silent: list[list[int]]
    cols: list[torch.Tensor] | None = None
    bound: torch.Tensor | None = None  # per candidate: bound on the max abs error of X from rounding


def _flat(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    owner = torch.tensor([k for k, r in enumerate(lists) for _ in r], dtype=torch.long)
    idx = torch.tensor([i for r in lists for i in r], dtype=torch.long)
    return owner, idx


def _certify(net: ReluMLP, c: _Cands, n_examples: int | None, opts: MaliciousOptions):
    """Label, certificate, reason, scale and residual of every candidate; and the batch's common scale."""
    n, K = c.X.shape[0], net.num_classes
    owner, idx = _flat(c.rows)
    o = torch.cat(c.obs) if c.obs else torch.empty(0, dtype=F64)
    pre = forward_trace(net, c.X).preactivations[0]
    bad = torch.zeros(n, dtype=F64)
    if len(owner):
        bad.index_add_(0, owner, (pre[owner, idx] <= 0).to(F64))
    s_owner, s_idx = _flat(c.silent)
    if len(s_owner):
        bad.index_add_(0, s_owner, (pre[s_owner, s_idx] > 0).to(F64))
    fires = bad == 0
    fits = np.full((n, K), np.nan)
    resid = np.full((n, K), np.inf)
    oo = torch.zeros(n, dtype=F64).index_add_(0, owner, o * o).clamp_min(1e-300)
    oc = torch.cat(c.cols) if c.cols else None
    if oc is not None:
        cc = torch.zeros(n, dtype=F64).index_add_(0, owner, (oc * oc).sum(1)).clamp_min(1e-300)
    for y in range(K):
        t = forward_trace(net, c.X, torch.full((n,), y, dtype=torch.long))
        p = t.deltas[0][owner, idx]
        pp = torch.zeros(n, dtype=F64).index_add_(0, owner, p * p)
        po = torch.zeros(n, dtype=F64).index_add_(0, owner, p * o)
        if oc is not None:
            nxt = t.deltas[1] if net.depth >= 2 else t.loss_vectors
            pc = nxt[owner] * t.activations[1][owner, idx][:, None]
            pp = pp.index_add_(0, owner, (pc * pc).sum(1))
            po = po.index_add_(0, owner, (pc * oc).sum(1))
        s = po / pp.clamp_min(1e-300)
        r = torch.zeros(n, dtype=F64).index_add_(0, owner, (o - s[owner] * p) ** 2)
        r = r / oo
        if oc is not None:  # both parts must fit, each relative to its own size
            rc = torch.zeros(n, dtype=F64).index_add_(0, owner, ((oc - s[owner, None] * pc) ** 2).sum(1)) / cc
            r = torch.maximum(r, rc)
        valid = pp > 0
        fits[valid.numpy(), y] = s[valid].numpy()
        resid[valid.numpy(), y] = r[valid].sqrt().numpy()
    fit_ok = (resid <= opts.fit_tol) & fires.numpy()[:, None]
    if opts.scale is not None:
        batch_scale = float(opts.scale)
    elif opts.known_scale:
        if not n_examples:
            raise UpdateError("known_scale needs the update's num_examples")
        batch_scale = 1.0 / n_examples
    else:
        multi = np.array([len(r) >= 2 for r in c.rows])
        batch_scale, support = _mode_scale(fits, fit_ok & multi[:, None], opts.scale_tol)
        if support < opts.min_support:  # too few multi-row candidates: let every candidate vote
            batch_scale, support = _mode_scale(fits, fit_ok, opts.scale_tol)
        if support < opts.min_support:  # one candidate alone always agrees with itself
            batch_scale = None
    if batch_scale is None:
        scale_ok = np.zeros_like(fit_ok)
    else:
        scale_ok = fit_ok & (np.abs(fits / batch_scale - 1) <= opts.scale_tol)
    labels, certified, reasons, scales, residuals = [], [], [], [], []
    for k in range(n):
        ok_y = np.nonzero(scale_ok[k])[0].tolist()
        best = int(np.argmin(resid[k])) if np.isfinite(resid[k]).any() else 0
        y = ok_y[0] if ok_y else best
        if not bool(fires[k]):
            cert, why = False, "the rebuilt input does not open (or close) the neurons it was read from"
        elif len(ok_y) > 1:
            cert, why = False, f"labels {ok_y} explain its rows equally well"
        elif not ok_y:
            cert, why = False, "no label explains its rows at the batch's common scale (a mixture of samples)"
        elif len(c.rows[k]) < opts.min_rows:
            cert, why = False, f"only {len(c.rows[k])} witness row(s) (need {opts.min_rows})"
        elif c.bound is not None and float(c.bound[k]) > opts.exact_tol:
            cert, why = False, (f"consistent, but rounding in the update may put an error of "
                                f"{float(c.bound[k]):.1e} (> {opts.exact_tol:g})")
        else:
            cert, why = True, "its recomputed gradient explains its rows at the batch's common scale"
        labels.append(y)
        certified.append(cert)
        reasons.append(why)
        scales.append(float(fits[k, y]))
        residuals.append(float(resid[k, y]))
    return labels, certified, reasons, scales, residuals, batch_scale


def _finish(net: ReluMLP, name: str, c: _Cands, labels, certified, reasons, scales, residuals,
            n_examples: int | None, opts: MaliciousOptions, start: float, notes: list[str]) -> Reconstruction:
    """Merge noisy copies of certified samples, keep at most ``num_examples`` candidates, and package."""
    n = len(labels)
    cert = torch.tensor(certified, dtype=torch.bool) if n else torch.zeros(0, dtype=torch.bool)
    lab = torch.tensor(labels, dtype=torch.long) if n else torch.zeros(0, dtype=torch.long)
    strength = torch.tensor([len(r) for r in c.rows], dtype=F64) if n else torch.zeros(0, dtype=F64)
    # certified first, then by number of rows: a copy within merge_tol of a kept sample is dropped
    order = sorted(range(n), key=lambda k: (not certified[k], -float(strength[k])))
    kept: list[int] = []
    if n:
        norms = c.X.norm(dim=1).clamp_min(1e-300)
        dist = torch.cdist(c.X, c.X) <= opts.merge_tol * norms[:, None]
        dropped = torch.zeros(n, dtype=torch.bool)
        for k in order:
            if dropped[k]:
                continue
            kept.append(k)
            dropped |= dist[k] & ((lab == lab[k]) | ~cert)
            dropped[k] = True
    limit = n_examples if n_examples else len(kept)
    n_cert = sum(1 for k in kept if certified[k])
    kept = [k for k in kept if certified[k]] + [k for k in kept if not certified[k]][: max(0, limit - n_cert)]
    if n and len(kept) < n:
        notes.append(f"{n - len(kept)} candidate(s) dropped as noisy copies or beyond the batch size")
    shape = net.input_shape or (net.input_dim,)
    out_dtype = net.dense[0].module.weight.dtype
    X = c.X[kept] if kept else torch.empty(0, net.input_dim, dtype=F64)
    return Reconstruction(
        inputs=X.to(out_dtype).reshape(len(kept), *shape),
        labels=torch.tensor([labels[k] for k in kept], dtype=torch.long),
        certified=torch.tensor([certified[k] for k in kept], dtype=torch.bool),
        attack=name,
        samples=tuple(
            SampleRecovery(label=labels[k], certified=certified[k], reason=reasons[k], witnesses=(len(c.rows[k]),),
                           residual=residuals[k], scale=scales[k])
            for k in kept
        ),
        batch_size=n_examples,
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
    )


def _first_layer(model: nn.Module, update, what: str):
    net = as_relu_mlp(model)
    if net.depth == 0 or net.dense[0].bias_name is None:
        raise ModelError(f"the {what} attack needs a first hidden layer with a bias")
    grads, n_examples, noise = _as_delta(model, update)
    d0 = net.dense[0]
    G = grads[d0.weight_name].to(F64).reshape(d0.out_features, -1)
    g = grads[d0.bias_name].to(F64)
    nG = noise[d0.weight_name].reshape(d0.out_features, -1).amax(1)
    ng = noise[d0.bias_name]
    G_next = grads[net.dense[1].weight_name].to(F64)
    return net, G, g, n_examples, (nG, ng), G_next


def _bound(X: torch.Tensor, nG: torch.Tensor, ng: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Estimated max abs error of ``X = num/den`` when num's entries err by ``nG`` and den by ``ng``."""
    return (nG ** 2 + (X.abs().amax(1) * ng) ** 2).sqrt() / den.abs().clamp_min(1e-300)


# -------------------------------------------------------------------------------------------------------
# The attacks


@register_attack("trap-weights", update_kinds=("gradient", "weights"),
                 description="malicious trap-weight first layer (Boenisch et al.): certified x = dW_i/db_i")
def trap_weights_attack(model: nn.Module, update, *, options: MaliciousOptions | None = None,
                        **overrides) -> Reconstruction:
    """Rebuild the samples that alone open a first-layer neuron of a trap-weight model.

    ``model`` is the model the server sent (e.g. from :func:`trap_weights`); ``update`` a gradient or a
    one-step weight update. Rows whose implied inputs ``dW_i/db_i`` coincide are grouped (leaders are
    the rows with the largest bias gradient, the least affected by rounding); a group's estimate is
    ``sum dW_i / sum db_i``; each group is certified as described in the module docstring.
    """
    start = time.perf_counter()
    opts = _options(options, overrides)
    net, G, g, n_examples, (nG, ng), G_next = _first_layer(model, update, "trap-weight")
    usable = torch.nonzero(g.abs() > opts.min_bias * float(g.abs().max().clamp_min(1e-300))).flatten()
    R = G[usable] / g[usable, None]
    groups = _group(R, g[usable].abs(), opts.group_tol)
    rows = [usable[grp].tolist() for grp in groups]
    X = (torch.stack([G[r].sum(0) / g[r].sum() for r in rows]) if rows
         else torch.empty(0, G.shape[1], dtype=F64))
    den = torch.stack([g[r].sum() for r in rows]) if rows else torch.empty(0, dtype=F64)
    bound = _bound(X, torch.stack([nG[r].square().sum().sqrt() for r in rows]) if rows else den,
                   torch.stack([ng[r].square().sum().sqrt() for r in rows]) if rows else den, den)
    cands = _Cands(X, rows, [g[r] for r in rows], [[] for _ in rows], [G_next[:, r].T for r in rows], bound)
    labels, certified, reasons, scales, residuals, batch_scale = _certify(net, cands, n_examples, opts)
    notes = [] if batch_scale is not None or not rows else ["no common scale: no candidate could be certified"]
    return _finish(net, "trap-weights", cands, labels, certified, reasons, scales, residuals, n_examples, opts,
                   start, notes)


@register_attack("imprint", update_kinds=("gradient", "weights"),
                 description="malicious imprint bins in the first layer (Robbing the Fed): certified bin differences")
def imprint_attack(model: nn.Module, update, *, bins: int | None = None, options: MaliciousOptions | None = None,
                   **overrides) -> Reconstruction:
    """Rebuild the samples alone in an imprint bin of a model made by :func:`imprint_weights`.

    The bins are found from the model itself: the leading first-layer rows that share one weight vector
    (``bins`` forces their number). Bins are sorted by threshold; the difference of consecutive bins'
    gradients isolates the samples between the two thresholds, and a candidate must open its bin and
    not the next one.
    """
    start = time.perf_counter()
    opts = _options(options, overrides)
    net, G, g, n_examples, (nG, ng), _ = _first_layer(model, update, "imprint")
    W0, b0 = net.weights()[0], net.biases()[0]
    if bins is None:
        same = (W0 - W0[0]).abs().amax(1) <= 1e-7 * float(W0[0].abs().max().clamp_min(1e-300))
        bins = int(same.int().cumprod(0).sum())
    if not 2 <= bins <= W0.shape[0]:
        raise ModelError("the model's first layer holds no imprint bins (see fedleak.attacks.malicious.imprint_weights)")
    order = torch.argsort(-b0[:bins])  # thresholds c_i = -b_i ascending
    G, g, nG, ng = G[:bins][order], g[:bins][order], nG[:bins][order], ng[:bins][order]
    idx = order.tolist()
    dG = torch.cat([G[:-1] - G[1:], G[-1:]])
    dg = torch.cat([g[:-1] - g[1:], g[-1:]])
    keep = torch.nonzero(dg.abs() > opts.min_bias * float(dg.abs().max().clamp_min(1e-300))).flatten().tolist()
    X = dG[keep] / dg[keep, None] if keep else torch.empty(0, G.shape[1], dtype=F64)
    dnG = torch.cat([(nG[:-1] ** 2 + nG[1:] ** 2).sqrt(), nG[-1:]])
    dng = torch.cat([(ng[:-1] ** 2 + ng[1:] ** 2).sqrt(), ng[-1:]])
    cands = _Cands(X, [[idx[k]] for k in keep], [dg[k : k + 1] for k in keep],
                   [[idx[k + 1]] if k + 1 < bins else [] for k in keep],
                   bound=_bound(X, dnG[keep], dng[keep], dg[keep]))
    labels, certified, reasons, scales, residuals, batch_scale = _certify(net, cands, n_examples, opts)
    notes = [] if batch_scale is not None or not keep else ["no common scale: no candidate could be certified"]
    return _finish(net, "imprint", cands, labels, certified, reasons, scales, residuals, n_examples, opts,
                   start, notes)
