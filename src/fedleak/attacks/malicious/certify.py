"""What the trap-weight and imprint attacks share: their options and the certificate of a candidate (see
:mod:`fedleak.attacks.malicious`; reading the update's first layer: :mod:`fedleak.attacks.malicious.read_layer`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedleak.attacks.label_sign import without_unsigned_labels
from fedleak.attacks.malicious.peel import FirstLayer
from fedleak.attacks.malicious.proofs import (
    BinCount,
    Proof,
    copies,
    counting_proof,
    refuted_as_one,
    shared_rows,
    whole_batch_proof,
)
from fedleak.attacks.malicious.scale_vote import mode_scale, shared_fraction
from fedleak.attacks.masked_input import InputMasking, withheld
from fedleak.errors import FedleakError, UpdateError
from fedleak.focal import check_focal_gamma
from fedleak.nets import Network, ReluMLP, forward_trace
from fedleak.option_fields import validate_fields
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import WeightUpdate
from fedleak.weight_change import UNSIGNED

F64 = torch.float64


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
    ``train_dropout``: whether the client ran the model's Dropout in training mode; where the model changes its
    input in training mode (a Dropout on it), nothing is certified unless told False
    (:mod:`fedleak.attacks.masked_input`).
    ``focal_gamma``: the exponent of the client's focal loss (:mod:`fedleak.focal`; 0: the cross-entropy): the
    recomputed gradients carry each sample's factor (trap weights; imprint's counting proof bounds the
    cross-entropy's loss vectors and refuses it).
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
    train_dropout: bool | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        validate_fields(self)
        check_focal_gamma(self.focal_gamma)


def resolve_options(options: MaliciousOptions | None, overrides: dict) -> MaliciousOptions:
    opts = options or MaliciousOptions()
    if overrides:
        unknown = set(overrides) - set(MaliciousOptions.__dataclass_fields__)
        if unknown:
            raise FedleakError(f"unknown option(s) for this attack: {sorted(unknown)}")
        opts = MaliciousOptions(**{**opts.__dict__, **overrides})
    return opts


@dataclass
class Candidates:
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
    alone: bool = False  # each claimed row is one no other sample of the batch opens (trap weights)
    bins: BinCount | None = None  # imprint: the bins that hold a sample
    layer: FirstLayer | None = None  # the update's first layer, for the whole-batch proof


def flat_index(lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, item) of every item of ``lists``."""
    owner = torch.tensor([k for k, r in enumerate(lists) for _ in r], dtype=torch.long, device=device)
    idx = torch.tensor([i for r in lists for i in r], dtype=torch.long, device=device)
    return owner, idx


@dataclass(frozen=True)
class Verdict:
    """One candidate's label, whether it is certified and why (or why not), and its fitted scale and residual at
    that label. ``standing``: it passed every check of its own (a proof that covers the batch may still be missing)."""

    label: int
    certified: bool
    reason: str
    scale: float
    residual: float
    standing: bool


def certify_candidates(net: ReluMLP, c: Candidates, n_examples: int | None,
                       opts: MaliciousOptions) -> tuple[list[Verdict], float | None]:
    """Every candidate's verdict, and the batch's common scale."""
    n, K, dev = c.X.shape[0], net.num_classes, c.X.device
    one_number = c.cols is None or (net.depth == 1 and K == 2)  # the rows check only the scale
    refused = ""
    owner, idx = flat_index(c.rows, dev)
    o = torch.cat(c.obs) if c.obs else torch.empty(0, dtype=F64, device=dev)
    trace = forward_trace(net, c.X)
    pre = trace.preactivations[0]
    bad = torch.zeros(n, dtype=F64, device=dev)
    if len(owner):
        bad.index_add_(0, owner, (pre[owner, idx] <= 0).to(F64))
    s_owner, s_idx = flat_index(c.silent, dev)
    if len(s_owner):
        bad.index_add_(0, s_owner, (pre[s_owner, s_idx] > 0).to(F64))
    fires = bad == 0
    fits = np.full((n, K), np.nan)
    resid = np.full((n, K), np.inf)
    oo = torch.zeros(n, dtype=F64, device=dev).index_add_(0, owner, o * o).clamp_min(1e-300)
    oc = torch.cat(c.cols) if c.cols else None
    if oc is not None:
        cc = torch.zeros(n, dtype=F64, device=dev).index_add_(0, owner, (oc * oc).sum(1)).clamp_min(1e-300)
    for y in range(K):
        t = forward_trace(net, c.X, torch.full((n,), y, dtype=torch.long, device=dev), focal_gamma=opts.focal_gamma)
        p = t.deltas[0][owner, idx]
        pp = torch.zeros(n, dtype=F64, device=dev).index_add_(0, owner, p * p)
        po = torch.zeros(n, dtype=F64, device=dev).index_add_(0, owner, p * o)
        if oc is not None:
            nxt = t.deltas[1] if net.depth >= 2 else t.loss_vectors
            pc = nxt[owner] * t.activations[1][owner, idx][:, None]
            pp = pp.index_add_(0, owner, (pc * pc).sum(1))
            po = po.index_add_(0, owner, (pc * oc).sum(1))
        s = po / pp.clamp_min(1e-300)
        r = torch.zeros(n, dtype=F64, device=dev).index_add_(0, owner, (o - s[owner] * p) ** 2)
        r = r / oo
        if oc is not None:  # both parts must fit, each relative to its own size
            rc = torch.zeros(n, dtype=F64, device=dev).index_add_(
                0, owner, ((oc - s[owner, None] * pc) ** 2).sum(1)) / cc
            r = torch.maximum(r, rc)
        valid = (pp > 0).cpu()
        fits[valid.numpy(), y] = s.cpu()[valid].numpy()
        resid[valid.numpy(), y] = r.cpu()[valid].sqrt().numpy()
    fires = fires.cpu()
    fit_ok = (resid <= opts.fit_tol) & fires.numpy()[:, None]
    if opts.scale is not None:
        batch_scale = float(opts.scale)
    elif opts.known_scale:
        if not n_examples:
            raise UpdateError("known_scale needs the update's num_examples")
        batch_scale = 1.0 / n_examples
    else:
        multi = np.array([len(r) >= 2 for r in c.rows])
        groups = copies(c.X, opts.merge_tol).cpu().numpy().argmax(1)  # a copy votes with the first of its group
        batch_scale, support = mode_scale(fits, fit_ok & multi[:, None], opts.scale_tol, groups)
        if support < opts.min_support:  # too few multi-row candidates: let every candidate vote
            batch_scale, support = mode_scale(fits, fit_ok, opts.scale_tol, groups)
        if support < opts.min_support:  # one candidate alone always agrees with itself
            batch_scale = None
        elif not one_number:  # (where the rows check only the scale, the whole-batch proofs rule a wrong one out)
            k = shared_fraction(batch_scale, fits, fit_ok, opts.scale_tol, n_examples or 64, groups, support)
            if k:
                batch_scale = None
                refused = (f"the scale most candidates agree on is {k} times a scale that others share, where a blend "
                           f"of {k} samples would sit near a model's initialisation: no common scale is certain")
    if batch_scale is None:
        scale_ok = np.zeros_like(fit_ok)
    else:
        scale_ok = fit_ok & (np.abs(fits / batch_scale - 1) <= opts.scale_tol)
    row_l1 = net.weights()[0].abs().sum(1)
    consistent = np.any(scale_ok, axis=1)
    shared = shared_rows(pre, row_l1, c.X, c.rows, c.bound, consistent, opts.merge_tol) if c.alone else {}
    labels, certified, reasons, scales, residuals = [], [], [], [], []
    for k in range(n):
        ok_y = np.nonzero(scale_ok[k])[0].tolist()
        best = int(np.argmin(resid[k])) if np.isfinite(resid[k]).any() else 0
        y = ok_y[0] if ok_y else best
        if not bool(fires[k]):
            cert, why = False, "the rebuilt input does not open (or close) the neurons it was read from"
        elif len(ok_y) > 1:
            cert, why = False, f"labels {ok_y} explain its rows equally well"
        elif refused and bool(fit_ok[k].any()):
            cert, why = False, refused
        elif not ok_y:
            cert, why = False, "no label explains its rows at the batch's common scale (a mixture of samples)"
        elif len(c.rows[k]) < opts.min_rows:
            cert, why = False, f"only {len(c.rows[k])} witness row(s) (need {opts.min_rows})"
        elif k in shared:
            cert, why = False, (f"another candidate consistent at the batch's scale opens neuron {shared[k]}, which "
                                f"one of the two claims alone: at most one of them is a sample")
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
    standing = list(certified)
    if any(certified) and one_number:  # a certificate needs a proof that covers the batch
        refuted = (refuted_as_one(net, trace, row_l1, owner, idx, c.silent, c.obs, c.bound, batch_scale,
                                  10 * opts.scale_tol) if c.bins is not None and c.bound is not None else None)
        proof = one_number_proof(net, c, refuted, labels, certified, batch_scale, n_examples, opts)
        if proof.holds:
            reasons = [f"{why}; its rows check only the scale, and {proof.why}" if ok else why
                       for ok, why in zip(certified, reasons)]
        else:
            reasons = [f"its rows check only the batch's scale, which a blend of samples may match by chance, and "
                       f"{proof.why}" if ok else why for ok, why in zip(certified, reasons)]
            certified = [False] * n
    verdicts = [Verdict(*v) for v in zip(labels, certified, reasons, scales, residuals, standing)]
    return verdicts, batch_scale


def one_number_proof(net: ReluMLP, c: Candidates, refuted: np.ndarray | None, labels: list[int],
                     certified: list[bool], batch_scale: float, n_examples: int | None,
                     opts: MaliciousOptions) -> Proof:
    """The proof that covers the whole batch (:mod:`fedleak.attacks.malicious.proofs`): counting the bins (imprint;
    ``refuted``: the candidates surely not one sample) or the whole first layer explained (trap weights)."""
    if c.bins is not None and refuted is not None:
        return counting_proof(refuted, np.array(certified, dtype=bool), c.bins, n_examples)
    if c.layer is not None:
        chosen = distinct(c.X, [k for k, ok in enumerate(certified) if ok], opts.merge_tol)
        return whole_batch_proof(net, c.X, labels, chosen, batch_scale, c.layer, n_examples, opts.group_tol,
                                 opts.fit_tol, opts.focal_gamma)
    return Proof(False, "no proof covers the whole batch")


def distinct(X: torch.Tensor, idx: list[int], merge_tol: float) -> list[int]:
    """``idx`` without copies of one sample (:func:`~fedleak.attacks.malicious.proofs.copies` of an earlier one)."""
    if not idx:
        return []
    same, kept = copies(X[idx], merge_tol), []
    for a in range(len(idx)):
        if not bool(same[a, kept].any()):
            kept.append(a)
    return [idx[a] for a in kept]


def finish(net: Network, name: str, c: Candidates, verdicts: list[Verdict], n_examples: int | None,
           opts: MaliciousOptions, start: float, notes: list[str], masking: InputMasking) -> Reconstruction:
    """Merge noisy copies of certified samples, keep at most ``num_examples`` candidates (certified, then standing,
    then by their number of rows), and package; no certificate where the model changes its input in training mode
    (``masking``, :mod:`fedleak.attacks.masked_input`)."""
    n = len(verdicts)
    labels, certified = [v.label for v in verdicts], [v.certified for v in verdicts]
    reasons = [v.reason for v in verdicts]
    masked = withheld(masking, opts.train_dropout) if any(certified) else ""
    if masked:  # the rows prove the input the first layer read, which the model may change in training mode
        reasons = [masked if ok else why for ok, why in zip(certified, reasons)]
        certified = [False] * n
        notes.append(f"certificates withheld: {masked}")
    X_all = c.X.cpu()
    cert = torch.tensor(certified, dtype=torch.bool) if n else torch.zeros(0, dtype=torch.bool)
    lab = torch.tensor(labels, dtype=torch.long) if n else torch.zeros(0, dtype=torch.long)
    strength = torch.tensor([len(r) for r in c.rows], dtype=F64) if n else torch.zeros(0, dtype=F64)
    # certified first, then standing, then by number of rows: a copy within merge_tol of a kept sample is dropped
    order = sorted(range(n), key=lambda k: (not certified[k], not verdicts[k].standing, -float(strength[k])))
    kept: list[int] = []
    if n:
        dist = copies(X_all, opts.merge_tol)
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
    if net.caveats and not any(certified[k] for k in kept):  # how the model was read may be the cause
        cause = "; or ".join(net.caveats)
        reasons = [f"{r}; or {cause}" if r else cause for r in reasons]
    out_dtype = net.head.dense[0].weight.dtype
    X = X_all[kept] if kept else torch.empty(0, net.input_dim, dtype=F64)
    return Reconstruction(
        inputs=X.to(out_dtype).reshape(len(kept), *net.input_shape),
        labels=torch.tensor([labels[k] for k in kept], dtype=torch.long),
        certified=torch.tensor([certified[k] for k in kept], dtype=torch.bool),
        attack=name,
        samples=tuple(
            SampleRecovery(label=labels[k], certified=certified[k], reason=reasons[k], witnesses=(len(c.rows[k]),),
                           residual=verdicts[k].residual, scale=verdicts[k].scale)
            for k in kept
        ),
        batch_size=n_examples,
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
    )


def with_sign_read(model: nn.Module, update, opts: MaliciousOptions, rec: Reconstruction) -> Reconstruction:
    """``rec``, with a two-class model's certificates withdrawn where the update's common scale is neither given
    (``scale``, ``known_scale``) nor known to be positive (a weight update's ``before - after`` is, unless it was
    read from a change whose sign was not read; so is a gradient's own scale ``1/num_examples``, where its certified
    samples share it), and the update's negative has a reading with the other labels
    (:func:`~fedleak.attacks.label_sign.without_unsigned_labels`); a change whose sign was not read, at a scale
    given, is held to the readings at that scale's size."""
    weights = isinstance(update, WeightUpdate)
    unsigned = weights and bool(update.metadata.get(UNSIGNED))
    given = opts.scale if opts.scale is not None else 1.0 / rec.batch_size if opts.known_scale and rec.batch_size \
        else None
    if (weights and not unsigned) or (given is not None and not unsigned):
        return rec
    own = 1.0 / rec.batch_size if rec.batch_size and not weights else None  # a gradient's, at its own scale
    # a change whose sign was not read, at a scale the server gave: its size is known, its sign not
    return without_unsigned_labels(model, rec, rec.batch_size, own_scale=own, focal_gamma=opts.focal_gamma,
                                   magnitude=given)
