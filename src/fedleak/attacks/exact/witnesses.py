"""Step 1 of the certificate: how each rebuilt sample explains its witness rows (docs/attacks.md,
"The certificate").

The rebuilt input's gradient is recomputed in float64; on every row it claims as its own (its *witnesses*) the
observed gradient must equal ``s_k`` times it, within that row's float32 noise; ``s_k`` is the sample's scale
(``1/M`` for a mean-loss gradient of ``M`` samples, times ``min(1, C/||g_k||)`` under per-sample clipping to
norm ``C``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedleak.nets import Trace, forward_trace
from fedleak.nets.float64 import rows64
from fedleak.nets.forward import backward_signals, loss_vectors

F64 = torch.float64


# -------------------------------------------------------------------------------------------------------
# Per-sample gradient pieces


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


def fit_witnesses(attack, complete: list, t64: Trace, label: LabelSignals) -> list[WitnessFit]:
    """Fit each complete candidate's witness rows (see :class:`WitnessFit`), ``t64`` their float64 trace and
    ``label`` their label entry's backward signals.

    The model for a witness's observed entries is ``s * (p0 + eps * p1)``: ``p0`` is the recomputed
    per-sample gradient (float64) and ``p1`` its derivative with respect to the label entry of the loss
    vector, whose float32 value ``p_y - 1`` the client computes with cancellation. ``s`` and ``eps`` are fitted
    jointly over all witnesses of the sample; ``|eps|`` must stay within float32 rounding and every witness
    must then match within its own noise level: the float32 noise of its recomputation, plus the update's
    own rounding noise where the update is known to carry more (a weight delta ``before - after``).
    """
    net, opts = attack.net, attack.opts
    consistent = reproduces_activations(complete, t64, attack.activation_tol)
    # samples are fitted together, a group at a time: at most a 32nd of the largest layer's entries (and at least
    # WITNESS_ENTRIES) of witness rows held at once, in float64 with their inputs and residuals (about 4.5 arrays of
    # that size: a quarter of the float32 gradient's size). Each group's label-entry signals and the client's float32
    # backward pass are made for it alone: hundreds of blends on two-class data would hold several times the
    # gradient's size in them
    budget = max(WITNESS_ENTRIES, max(G.numel() for G in attack.G) // 32)
    width = [attack.G[i].shape[1] + 1 + net.num_classes for i in range(net.depth)]
    replay = client_forward(attack, t64)
    fits: list[WitnessFit] = []
    group: list[int] = []
    load = 0
    for k, c in enumerate(complete):
        entries = sum(min(len(rows), opts.max_witnesses) * width[i] for i, rows in c.witnesses.items())
        if group and load + entries > budget:
            fits.extend(fit_group(attack, complete, group, signals(attack, t64, replay, label, group), consistent))
            group, load = [], 0
        group.append(k)
        load += entries
    if group:
        fits.extend(fit_group(attack, complete, group, signals(attack, t64, replay, label, group), consistent))
    return fits


def label_signals(attack, hidden: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The backward signals of the label entry of the loss vector (``d_one``, float64, one row per sample) for
    samples with hidden activations ``hidden`` (a ReLU's mask read from its output: ``z > 0`` iff ``relu(z) > 0``)
    and labels ``labels``, and its one-hot vectors."""
    onehot = torch.nn.functional.one_hot(labels, attack.net.num_classes).to(F64)
    return backward_signals(attack.W, hidden, onehot), onehot


class LabelSignals:
    """The label entry's backward signals (:func:`label_signals`) of the candidates of the float64 trace ``t64``
    (``labels`` theirs), for any set of them: made once for all where they take at most a quarter of the
    gradient's size (in float64), else for each set asked for (a backward pass each: the hundreds of blends of
    two-class data would hold several times the gradient's size in them)."""

    def __init__(self, attack, t64: Trace, labels: torch.Tensor):
        self.attack, self.t64, self.labels = attack, t64, labels
        size = len(labels) * sum(a.shape[1] for a in t64.activations[1:])
        small = 8 * size <= attack.update_size() // 4  # float64 bytes: at most a quarter of the gradient's
        self.whole = label_signals(attack, t64.activations[1:], labels) if small else None

    def of(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(d_one, onehot)`` of the candidates ``idx``, one row each."""
        if self.whole is not None:
            d_one, onehot = self.whole
            return [d[idx] for d in d_one], onehot[idx]
        return label_signals(self.attack, [a[idx] for a in self.t64.activations[1:]], self.labels[idx])


def client_forward(attack, t64: Trace) -> Trace:
    """The client's float32 forward pass of all candidates of ``t64`` at once (one product per layer: each
    candidate's rounding is the same however the witness fit groups them), without its pre-activations (the
    activations give the same ReLU masks) or inputs (each group converts its own): they would be as large as the
    float32 trace itself."""
    t32 = forward_trace(attack.net, t64.activations[0].to(attack.obs_dtype), dtype=attack.obs_dtype, keep_pre=False)
    inputs = t32.activations[0].new_empty((0, t32.activations[0].shape[1]))  # not a view: the inputs are freed
    return Trace([inputs, *t32.activations[1:]], [], t32.logits, None, None)


def signals(attack, t64: Trace, replay: Trace, label: LabelSignals, ks: list[int]) -> Signals:
    """What the witness fit of the candidates ``ks`` reads (:class:`Signals`), from the float64 trace ``t64`` of
    all candidates, their label entry's signals ``label`` and their float32 forward pass ``replay``
    (:func:`client_forward`): the client's float32 backward pass is made for them alone."""
    idx = torch.tensor(ks, dtype=torch.long, device=t64.logits.device)
    y = label.labels[idx]
    d_one, onehot = label.of(idx)
    acts32 = [t64.activations[0][idx].to(attack.obs_dtype)] + [a[idx] for a in replay.activations[1:]]
    # float32 noise without the label-entry cancellation (that part is fitted): exact e_y, float32 rest
    e32 = loss_vectors(replay.logits[idx], y, attack.opts.smoothing, attack.opts.focal_gamma)
    rows_k = torch.arange(len(ks), device=idx.device)
    e32[rows_k, y] = t64.loss_vectors[idx, y].to(attack.obs_dtype)
    d32 = backward_signals(attack.W_obs, acts32[1:], e32)  # a ReLU's mask from its output: z > 0 iff relu(z) > 0
    return Signals(t64, idx, d_one, onehot, acts32, d32, e32.to(F64))


WITNESS_ENTRIES = 1 << 16  # float64 entries of witness rows a group may always hold (512 KiB)
COMPARED = 64  # candidates whose activations are compared with the trace's at once


@dataclass(frozen=True)
class Signals:
    """What the witness fit reads of a group of rebuilt samples (one row per sample of the group, in its order):
    their float64 trace, the backward signals and vectors of the label entry (``d_one``, ``onehot``), and the
    client's float32 replay: its activations and backward signals as it computed them (read in float64 where
    used: a float64 copy would be as large as the trace), its loss vectors in float64, the label entry exact.
    ``t64`` is the trace of all candidates: the group's samples are its rows ``members``."""

    t64: Trace
    members: torch.Tensor
    d_one: list[torch.Tensor]
    onehot: torch.Tensor
    acts32: list[torch.Tensor]
    d32: list[torch.Tensor]
    e32: torch.Tensor


@dataclass(frozen=True)
class WitnessBlock:
    """Witness rows of one dense layer, row ``j`` for sample ``own[j]``, as the fit reads them. A row's recomputed
    per-sample gradient is rank one in its sample's input ``a``: ``p0 = [d0 a, d0, h e0]`` (the weight row, the bias
    entry and, for the top layer, the output layer's column through the row's activation ``h``); ``p1`` is the same
    with the label entry's signals ``d1``, ``e1``. So the dot products with the observed entries
    ``o = [G_j, g_j, c_j]`` need only ``G_j`` and ``a`` (held: ``Gr``, ``A``) and per-row scalars: ``p00 = p0.p0``,
    ``p01``, ``p11``, ``p0o``, ``p1o``, ``oo = o.o``; ``noise`` is ``|p32 - p0|``, the client's float32 replay's
    difference."""

    Gr: torch.Tensor
    A: torch.Tensor
    gb: torch.Tensor | None
    col: torch.Tensor | None
    d0: torch.Tensor
    d1: torch.Tensor
    h: torch.Tensor | None
    e0: torch.Tensor | None
    e1: torch.Tensor | None
    p00: torch.Tensor
    p01: torch.Tensor
    p11: torch.Tensor
    p0o: torch.Tensor
    p1o: torch.Tensor
    oo: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def of(cls, attack, sig: Signals, i: int, own: torch.Tensor, rows: torch.Tensor) -> WitnessBlock:
        """The witness rows ``rows`` of dense layer ``i``, row ``j`` of the group's sample ``own[j]`` (its place in
        the group of ``sig``)."""
        t64, mine = sig.t64, sig.members[own]
        bias = attack.g[i] is not None
        # what depends on the sample only is taken once for each of the rows' samples (``a``, their inputs): |[a, 1]|^2
        # and the float32 replay's differences
        samples, at = torch.unique(own, return_inverse=True)
        a = t64.activations[i][sig.members[samples]]
        A = a[at]  # each row's sample's input
        diff = sig.acts32[i][samples].to(F64) - a
        aa = (a * a).sum(1)[at] + float(bias)
        dd, da = (diff * diff).sum(1)[at], (diff * a).sum(1)[at]
        d0, d1, d32 = t64.deltas[i][mine, rows], sig.d_one[i][own, rows], sig.d32[i][own, rows].to(F64)
        Gr = rows64(attack.G[i], rows)
        oa, oo = torch.linalg.vecdot(Gr, A), torch.linalg.vector_norm(Gr, dim=1) ** 2
        gb = None
        if bias:
            gb = attack.g[i][rows].to(F64)
            oa, oo = oa + gb, oo + gb * gb
        c = d32 - d0  # p32 - p0 = [d32 (a32 - a) + c a, c, h32 e32 - h e0]
        p00, p01, p11 = d0 * d0 * aa, d0 * d1 * aa, d1 * d1 * aa
        p0o, p1o = d0 * oa, d1 * oa
        sq_noise = d32 * d32 * dd + 2 * d32 * c * da + c * c * aa
        col = h = e0 = e1 = None
        if i == attack.net.depth - 1:
            h, h32 = t64.activations[i + 1][mine, rows], sig.acts32[i + 1][own, rows].to(F64)
            e0, e1 = t64.loss_vectors[mine], sig.onehot[own]
            col = attack.G[-1][:, rows].T.to(F64)
            hh = h * h
            p00, p01, p11 = p00 + hh * (e0 * e0).sum(1), p01 + hh * (e0 * e1).sum(1), p11 + hh * (e1 * e1).sum(1)
            p0o, p1o = p0o + h * (col * e0).sum(1), p1o + h * (col * e1).sum(1)
            oo = oo + (col * col).sum(1)
            sq_noise = sq_noise + ((h32[:, None] * sig.e32[own] - h[:, None] * e0) ** 2).sum(1)
        return cls(Gr, A, gb, col, d0, d1, h, e0, e1, p00, p01, p11, p0o, p1o, oo, sq_noise.clamp_min(0).sqrt())

    def residuals(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``|o - s p0 - t p1|`` per row (``s``, ``t``: per row), formed entry by entry (no cancellation)."""
        c = s * self.d0 + t * self.d1
        sq = torch.linalg.vector_norm(torch.addcmul(self.Gr, self.A, c[:, None], value=-1), dim=1) ** 2
        if self.gb is not None:
            sq = sq + (self.gb - c) ** 2
        if self.col is not None:
            fitted = self.h[:, None] * (s[:, None] * self.e0 + t[:, None] * self.e1)
            sq = sq + ((self.col - fitted) ** 2).sum(1)
        return sq.sqrt()


def fit_group(attack, complete: list, ks: list[int], sig: Signals, consistent: list[bool]) -> list[WitnessFit]:
    """:func:`fit_witnesses` for the candidates ``ks`` (``sig``: their signals, :func:`signals`), all at once:
    their witness rows laid end to end (each sample's in its own order), read a layer at a time
    (:class:`WitnessBlock`), and every sample's fit iterated together."""
    net, opts = attack.net, attack.opts
    dev = sig.t64.logits.device
    eps32 = float(torch.finfo(attack.obs_dtype).eps)
    eps_bound = opts.label_eps_ulps * eps32
    sample_of: list[int] = []
    layer_of: list[int] = []
    row_of: list[int] = []
    ends: list[int] = []  # where each sample's rows end
    for j, k in enumerate(ks):
        for i, rows in complete[k].witnesses.items():
            rows = rows[: opts.max_witnesses]  # the strongest rows come first
            sample_of += [j] * len(rows)
            layer_of += [i] * len(rows)
            row_of += rows
        ends.append(len(row_of))
    n, n_rows = len(ks), len(row_of)
    sample_t = torch.tensor(sample_of, dtype=torch.long, device=dev)
    layer_t = torch.tensor(layer_of, dtype=torch.long, device=dev)
    row_t = torch.tensor(row_of, dtype=torch.long, device=dev)
    noise = torch.zeros(n_rows, dtype=F64, device=dev)
    norm = torch.zeros(n_rows, dtype=F64, device=dev)
    dots = torch.zeros(5, n_rows, dtype=F64, device=dev)  # per row: p0.p0, p0.p1, p1.p1, p0.o, p1.o (over o.o)
    blocks = []
    for i in sorted(set(layer_of)):
        pos = torch.nonzero(layer_t == i).flatten()
        own, rows = sample_t[pos], row_t[pos]  # the rows' samples, by their place in the group (as ``sig``'s rows)
        block = WitnessBlock.of(attack, sig, i, own, rows)
        oo = block.oo.clamp_min(1e-300)
        noise[pos] = block.noise / block.p00.sqrt().clamp_min(1e-300) + 8 * eps32
        norm[pos] = oo.sqrt()  # each witness weighs the same: its observed entries scaled to norm 1
        if attack.noise is not None:  # the update's own rounding, relative to the row
            own_noise = attack.noise_vectors(i, rows)
            noise[pos] += own_noise.norm(dim=1) / norm[pos]
        dots[:, pos] = torch.stack([block.p00, block.p01, block.p11, block.p0o, block.p1o]) / oo
        blocks.append((pos, block))
    tol = torch.maximum(torch.full_like(noise, opts.check_tol), opts.noise_factor * noise)
    quiet = noise <= opts.max_noise
    ok = quiet.clone()
    s_fit = torch.full((n,), float("nan"), dtype=F64, device=dev)
    t_fit, eps_fit = s_fit.clone(), s_fit.clone()
    res = torch.full_like(noise, float("inf"))
    active = torch.ones(n, dtype=torch.bool, device=dev)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(values.shape[:-1] + (n,), dtype=F64, device=dev).index_add_(-1, sample_t, values)

    for _ in range(3):  # fit on the rows that pass, re-test all rows; a sample stops when its rows do not change
        active &= per_sample(ok.to(F64)) > 0
        if not bool(active.any()):
            break
        # least squares in (s, t = s * eps) through its 2x2 normal equations, one per sample
        sums = per_sample(dots * ok.to(F64))[:, active]
        gram = torch.stack([sums[0], sums[1], sums[1], sums[2]], 1).reshape(-1, 2, 2)
        rhs = sums[3:].T
        coef = torch.linalg.lstsq(gram.cpu(), rhs[:, :, None].cpu()).solution[:, :, 0].to(dev)  # CPU: rank-revealing
        s, t = coef[:, 0], coef[:, 1]
        eps = torch.where(s != 0, t / s, torch.full_like(s, float("inf")))
        clamp = ~(eps.abs() <= eps_bound)  # the best correction allowed: at the bound, refit the scale
        eps_c = torch.where(torch.isfinite(eps), torch.copysign(torch.full_like(eps, eps_bound), eps),
                            torch.zeros_like(eps))
        cc = gram[:, 0, 0] + 2 * eps_c * gram[:, 0, 1] + eps_c**2 * gram[:, 1, 1]
        s_c = (rhs[:, 0] + eps_c * rhs[:, 1]) / cc.clamp_min(1e-300)
        s_fit[active] = torch.where(clamp, s_c, s)
        t_fit[active] = torch.where(clamp, s_c * eps_c, t)
        eps_fit[active] = torch.where(clamp, eps_c, eps)
        live = active[sample_t]
        for pos, block in blocks:
            fresh = block.residuals(s_fit[sample_t[pos]], t_fit[sample_t[pos]]) / norm[pos]
            res[pos] = torch.where(live[pos], fresh, res[pos])
        new_ok = torch.where(live, (res <= tol) & quiet, ok)
        active &= per_sample((new_ok != ok).to(F64)) > 0
        ok = new_ok
    counts = torch.zeros(n, net.depth, dtype=torch.long, device=dev).index_put_(
        (sample_t, layer_t), ok.long(), accumulate=True).tolist()
    worst = torch.full((n,), -float("inf"), dtype=F64, device=dev).scatter_reduce_(
        0, sample_t, torch.where(ok, res, torch.full_like(res, -float("inf"))), "amax").tolist()
    noisy = per_sample((~quiet).to(F64)).tolist()
    abs_tol, noise_l, ok_l = (tol * norm).tolist(), noise.tolist(), ok.tolist()
    s_l, eps_l = s_fit.tolist(), eps_fit.tolist()
    fits = []
    for j, (k, start, end) in enumerate(zip(ks, [0] + ends[:-1], ends)):
        passing = tuple((layer_of[r], row_of[r], abs_tol[r]) for r in range(start, end) if ok_l[r])
        quiet_noise = sorted(noise_l[r] for r in range(start, end) if ok_l[r])
        n_ok = len(quiet_noise)
        # torch's median of an even count is the lower middle value
        precision = opts.noise_factor * quiet_noise[(n_ok - 1) // 2] / math.sqrt(n_ok) if n_ok else opts.scale_tol
        fits.append(WitnessFit(s_l[j], eps_l[j], worst[j] if n_ok else float("inf"), tuple(counts[j]),
                               int(noisy[j]), consistent[k], passing, min(opts.scale_tol, precision)))
    return fits


def reproduces_activations(complete: list, t64: Trace, tol: Callable[[int], float]) -> list[bool]:
    """Whether each candidate's known activations are its rebuilt input's own (float64 forward pass ``t64``),
    within ``tol(i)`` relative at every level ``i`` it knows: one comparison per level for all candidates."""
    ok = torch.ones(len(complete), dtype=torch.bool, device=t64.logits.device)
    for i in {i for c in complete for i in c.acts}:
        level_tol = tol(i)
        have = [k for k, c in enumerate(complete) if i in c.acts]
        for s in range(0, len(have), COMPARED):  # a piece of candidates at a time (hundreds, on two-class data)
            part = have[s : s + COMPARED]
            ref = t64.activations[i][part]
            off = ref - torch.stack([complete[k].acts[i] for k in part])
            ok[part] &= off.norm(dim=1) <= level_tol * ref.norm(dim=1).clamp_min(1e-300)
    return ok.tolist()


def input_uncertainty(attack, fit: WitnessFit, x: torch.Tensor) -> float:
    """How far the update's own rounding can have moved a rebuilt input (max abs, 5 standard deviations), where
    that rounding is known and larger than the gradient's float32 noise: a weight delta, whose ``after`` the
    client rounded to one ulp. The input is the ratio of weight row and bias entry of its witness rows at the
    first layer, ``G_j / g_j``; a rounding error uniform within one ulp of ``after`` moves it by up to
    ``(nu_G + |x| nu_g) / |g_j|`` per entry, with standard deviation ``1/sqrt(12)`` of that, averaged over the
    rows; plus how far the input is from its witnesses' own ratio, or, where more, how far one witness row
    disagrees with it beyond that row's rounding: a row carrying more noise than stated (a peeling residual's row
    holding an earlier round's error) pulls the mean off the sample while the others hold it (an input 9.9e-5 of
    the range off passed on a trained Fashion-MNIST MLP without this). Zero when the noise is not known (a
    gradient) or the first layer has no bias."""
    if attack.noise is None or attack.g[0] is None:
        return 0.0
    rows = [row for layer, row, _ in fit.passing if layer == 0]
    if not rows:
        return 0.0
    g = attack.g[0][rows]
    per_row = ((attack.noise[0].rows(rows) + x.abs()[None, :] * attack.noise_b[0][rows, None])
               / g.abs()[:, None].clamp_min(1e-300) / math.sqrt(12))
    spread = float(5 * (per_row.pow(2).sum(0).sqrt() / len(rows)).max())
    # the input itself may rest on more (and weaker) rows than its witnesses: it must agree with the witnesses'
    # own ratio (weighted by g^2, the inverse of each ratio's variance) within that spread too
    weights = g * g
    ratios = rows64(attack.G[0], rows) / g[:, None]
    ratio = (ratios * weights[:, None]).sum(0) / weights.sum()
    # and no closer than any witness row disagrees with it beyond that row's own rounding (its width, sqrt(12)
    # standard deviations): a row whose noise is more than stated (a residual's row holding an earlier round's error,
    # or another sample's share) pulls the mean off the sample, and the rows then disagree
    scatter = float(((ratios - x).abs() - math.sqrt(12) * per_row).clamp_min(0).max())
    return spread + max(float((x - ratio).abs().max()), scatter)
