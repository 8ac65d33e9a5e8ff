"""Groups of last-ReLU-layer rows that surely fail the candidate check, found without a forward pass per group.

A row of the layer's gradient is a sum of the batch's inputs to the layer, each weighted by its sample's
backward signal, so every group's implied input lies in the span of the batch's ``M`` inputs, up to the
update's rounding. The groups' inputs ``X`` (``n x d``) then factor as ``X = C Q^T + R``: ``Q`` an orthonormal
basis of ``r`` columns (from a Gaussian sketch of ``X``'s rows), ``C = X Q``, and a remainder ``R`` of the
rounding's size, bounded row by row (:mod:`~fedleak.attacks.exact.row_span`; any ``Q`` is sound: the bound reads
the ``R`` it leaves).
The layer's pre-activations are ``(W Q) C^T`` (one product with ``r`` columns instead of ``n``) up to
``||W_o|| ||R_k||`` per unit ``o`` (Cauchy-Schwarz) and the float64 rounding of both sides. That bound is carried
through the ReLU and the output layer to the logits, through the softmax to the loss vector (each entry off by
a factor within ``exp(+-4L)``), and to the angle the check measures. A group is dropped only where every member
row surely fails the check (a wrong label, a unit that surely stays silent, or a column whose angle to the loss
vector surely exceeds the tolerance) or, with a bias, one of its rows surely stays silent. The exact float64
pass (:func:`fedleak.attacks.exact.candidates.top_candidates`) runs on the others, so the candidates are the
same. The screen runs where it pays: where the groups outnumber twice the basis's width by enough that the
forward passes saved outweigh its fixed cost (``MIN_SAVING``); the sketch is widened only as far as that and
an eighth of the passes' cost allow. A probe of ``PROBE`` groups spread over all of them is screened first; the
others are screened (``CHUNK`` at a time, as the exact pass forwards them) only where the probe dropped enough
of its groups to pay for screening them, a share that falls with the layer's input size (``SCREEN_COST``):
where most groups pass (two classes, whose loss vectors all lie on one line, pass most blends of samples) the
rest go to the exact pass unscreened. Under label smoothing it does not run: its bound holds for the softmax's
entries ``p_c``, not for the loss vector's ``p_c - s/K``, which can cancel; nor with ``train_dropout``, whose
loss vectors are read off the columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.attacks.exact.row_span import SpanCoordinates, in_pieces, span_coordinates
from fedleak.attacks.exact.top_check import end_to_end, fit_top_rows
from fedleak.nets.float64 import linear64, times64

F64 = torch.float64
CHUNK = 256  # groups screened at once (their pre-activations are held: CHUNK x the layer's outputs)
PROBE = 64  # groups screened first, spread over all of them: the rest are screened where the probe dropped ...
SCREEN_COST = 200  # ... at least SCREEN_COST / d_in of its groups: per group and unit, the screen costs about what
# this many multiply-adds of the exact pass do (20 us against 63 us per group on a 2048 x 625 layer, one core)
MIN_SAVING = 50_000_000  # the screen runs where the forward passes it can save (n - 2 r groups) come to at
# least this many multiply-adds (about 3 ms on one core), several times its own fixed cost
EPS64 = float(torch.finfo(F64).eps)


def allowance(fan_in: int, r: int = 0) -> float:
    """Relative allowance for the float64 rounding of a product of fan-in ``fan_in`` through a basis of ``r``
    columns, on either side (the exact check's and the screen's): ten times ``(fan_in + r + 2) sqrt(r + 1) eps``."""
    return 10 * (fan_in + r + 2) * (r + 1) ** 0.5 * EPS64


def upper_row_norms(W: torch.Tensor) -> torch.Tensor:
    """Upper bounds of the norms of ``W``'s rows (float64): the norms in ``W``'s own dtype, raised by their
    rounding bound ``(d + 2) eps`` and by ``d`` times the dtype's smallest normal number (a square below it
    may be flushed to zero); a row whose squares overflow gets an infinite bound."""
    info = torch.finfo(W.dtype)
    d = W.shape[1]
    norm = torch.linalg.vector_norm(W, dim=1).to(F64)
    return (norm.square() + d * info.tiny).sqrt() * (1 + (d + 2) * info.eps)


def span_screen(attack, reps: torch.Tensor, members: list[torch.Tensor],
                rows: list[torch.Tensor] | None) -> torch.Tensor:
    """Which groups may pass the candidate check (one bool per group; False only where it surely fails) for
    groups with inputs ``reps`` (``n x d``, float64), member rows ``members`` and, where every row of a group
    must fire (a layer with a bias), all its rows ``rows``."""
    n = reps.shape[0]
    t = attack.net.depth - 1
    W = attack.W[t]
    keep = torch.ones(n, dtype=torch.bool, device=reps.device)
    # the basis may be as wide as still saves MIN_SAVING, and its sketch costs at most an eighth of the passes
    max_rank = min((n - -(-int(MIN_SAVING) // (W.shape[0] * W.shape[1]))) // 2, W.shape[0] // 8)
    # its bound holds for p_c, not for p_c - s/K, for a focal loss's factor, nor for loss vectors read off the
    # columns (train_dropout)
    if n < 4 or max_rank < 1 or attack.opts.smoothing or attack.opts.focal_gamma or attack.opts.train_dropout:
        return keep
    coords = span_coordinates(in_pieces(reps, CHUNK), n, reps.shape[1], max_rank)
    if coords is None:
        return keep
    basis = Basis.of(attack, reps, coords)

    def screen(part: torch.Tensor) -> None:
        at = part.tolist()
        keep[part] = basis.screen(attack, part, [members[k] for k in at],
                                  [rows[k] for k in at] if rows is not None else None)

    # a probe spread over the groups (the strongest come first, and pass most often) says whether the rest pay
    every = torch.arange(n, device=reps.device)
    probe = torch.linspace(0, n - 1, min(PROBE, n), device=reps.device).round().long().unique()
    screen(probe)
    if int((~keep[probe]).sum()) < SCREEN_COST / W.shape[1] * len(probe):
        return keep
    rest = every[torch.ones(n, dtype=torch.bool, device=reps.device).index_fill_(0, probe, False)]
    for start in range(0, len(rest), CHUNK):
        screen(rest[start : start + CHUNK])
    return keep


@dataclass(frozen=True)
class Basis:
    """The groups' inputs on the basis ``Q``: the layer's weights times ``Q`` (``WQ``), the coordinates ``C``,
    ``s_k`` such that ``|z - z_exact| <= w_o s_k + tiny |b_o|`` at group ``k``'s unit ``o`` (``z_exact``: the exact
    check's float64 pass; ``w``: upper bounds of ``W``'s row norms), and the allowances ``tiny`` (this layer) and
    ``tiny_out`` (the output layer) for float64 rounding."""

    WQ: torch.Tensor
    C: torch.Tensor
    s: torch.Tensor
    w: torch.Tensor
    w_out: torch.Tensor
    tiny: float
    tiny_out: float

    @classmethod
    def of(cls, attack, reps: torch.Tensor, coords: SpanCoordinates) -> Basis:
        t = attack.net.depth - 1
        W, Wo = attack.W[t], attack.W[-1]
        Q, C = coords.Q, coords.C
        tiny = allowance(W.shape[1], Q.shape[1])
        size = torch.linalg.vector_norm(reps, dim=1) + torch.linalg.vector_norm(C, dim=1)
        return cls(times64(W, Q), C, (coords.rho + tiny * size) * (1 + tiny), upper_row_norms(W),
                   upper_row_norms(Wo), tiny, allowance(Wo.shape[1]))

    def screen(self, attack, part: torch.Tensor, members: list[torch.Tensor], rows: list[torch.Tensor] | None
               ) -> torch.Tensor:
        """:func:`span_screen` for the groups ``part`` (indices)."""
        t = attack.net.depth - 1
        b, Wo, bo = attack.b[t], attack.W[-1], attack.b[-1]
        C, s, w, tiny, tiny_out = self.C[part], self.s[part], self.w, self.tiny, self.tiny_out
        z = torch.addmm(b, C, self.WQ.T) if b is not None else C @ self.WQ.T  # groups x d_out
        b_abs = b.abs() if b is not None else torch.zeros_like(w)
        a = torch.relu(z)
        logits = linear64(a, Wo)
        if bo is not None:
            logits = logits + bo
        # the error's norm over the units (its terms are all non-negative: no cancellation)
        err_norm = (s.square() * w.square().sum() + 2 * tiny * s * (w * b_abs).sum()
                    + tiny**2 * b_abs.square().sum()).sqrt() * (1 + tiny)
        spread = err_norm + tiny_out * (2 * torch.linalg.vector_norm(a, dim=1) + err_norm)
        L = self.w_out[None, :] * spread[:, None]
        if bo is not None:
            L = L + tiny_out * bo.abs()[None, :]
        # each entry of the loss vector off its label is off by a factor within exp(+-4 max L); the angle between
        # the loss vectors' lines is then at most asin(delta), and the check's residual (a sine) moves as much
        K = Wo.shape[0]
        delta = torch.expm1(4 * L.amax(1)) + allowance(K)
        margin = torch.where(delta < 1, torch.asin(delta.clamp(max=1.0)), torch.full_like(delta, 10.0)) + allowance(K)
        fit = fit_top_rows(attack, members, z, logits)
        others = fit.e.abs().scatter(1, fit.label[:, None], 0.0).amax(1)
        known = (others > 1e-200)[fit.owner]  # a loss vector that underflowed is left to the exact pass
        row_err = (w[fit.rows] * s[fit.owner] + tiny * b_abs[fit.rows]) * (1 + tiny)
        firing = fit.z > row_err
        fails = (~fit.labelled | (fit.z + row_err <= 0)
                 | (firing & known & (fit.res - margin[fit.owner] > attack.top_tol)))
        n = len(members)
        keep = torch.zeros(n, dtype=torch.long, device=z.device).index_add_(0, fit.owner, (~fails).long()) > 0
        if rows is not None:
            flat, owner = end_to_end(rows)
            bound = (w[flat] * s[owner] + tiny * b_abs[flat]) * (1 + tiny)
            silent = (z[owner, flat] + bound <= 0).long()
            keep &= torch.zeros(n, dtype=torch.long, device=z.device).index_add_(0, owner, silent) == 0
        return keep
