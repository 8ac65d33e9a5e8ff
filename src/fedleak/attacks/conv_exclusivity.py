"""Certified exclusivity attack on FedSGD gradients of convolutional ReLU networks (issue 6).

Design (algorithms spec §2.6; details and the certifiable condition in docs/cnn.md):

1. **FC head.** The head ``Linear (ReLU Linear)+`` is an MLP on the flattened conv features, so the MLP
   attack (:mod:`fedleak.attacks.exclusivity`: grouping of the rows of the last ReLU layer by implied
   input, forward checks, walk-down) runs on it unchanged and yields, per sample, the label and the
   feature vector ``f`` (the input of the first Linear layer; with a bias, ``G[j,:] / g[j]``).
2. **Conv blocks, top down.** A block computes ``out = pool(relu(A x + c))`` (``A``: unrolled sparse
   conv, eval-mode BN folded). Without pooling, every unit with ``out_u > 0`` gives the exact equation
   ``A_u x + c_u = out_u``; when these rows have full column rank the input is unique and solved by
   least squares. With average or max pooling the map is *convex* in ``x`` (a non-negative sum / a max of
   ReLUs of affine functions); the input is found by iterating the activation pattern, and it is proven
   unique by a Gordan-type certificate: a strictly positive ``lambda`` with ``J^T lambda = 0`` for the
   Jacobian (a subgradient) ``J`` at the solution, plus full column rank of ``J`` (an LP and a Cholesky
   factorisation). Every solve comes with a rigorous 2-norm error bound from a *proven* lower bound on
   ``sigma_min`` (band Cholesky of ``J^T J - tau I``, :mod:`fedleak.attacks.normal_equations`) and the
   float32 noise of the known output; the bounds are chained down to the input.
3. **Certificate.** A sample is certified when every conv block was solved uniquely with a total error
   bound below ``max_error``, the rebuilt input reproduces the feature vector by a forward pass (float64
   and float32), and the MLP certificate, recomputed *from the rebuilt input's features*, passes on the
   head's witness rows (>= 2 at the last ReLU layer, common scale 1/M). When every sample of the batch is
   rebuilt and uniquely solved, the whole recomputed gradient (every conv and FC parameter, real autograd)
   must reproduce the observed one; that certifies single-ExAN samples as well.
4. **Fallback.** Where a block is underdetermined, the input is rebuilt by feature matching (Adam with
   total-variation prior, matching the lowest activation known exactly) and reported *uncertified*.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linprog
from torch import nn

from fedleak.attacks.exclusivity import (
    ExclusivityOptions,
    ExclusivityAttack,
    estimate_label_counts,
    unique_candidates,
)
from fedleak.attacks.normal_equations import normal_equations
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError
from fedleak.models.conv_gram import pixel_major_order
from fedleak.models.convnet import ConvBlock, ReluCNN, as_relu_cnn
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import GradientUpdate, as_gradient_update, check_matches_model
from fedleak.validation import validate_fields

F64 = torch.float64
EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class ConvExclusivityOptions:
    """Options of the CNN attack (the FC head uses :class:`ExclusivityOptions`, field ``head``).

    ``max_error``: a sample is certified only if the proven 2-norm error bound of its rebuilt input is
    below this (so its max abs error is too). ``rounding``: the client's float32 rounding of a unit is
    modelled as ``rounding * (sqrt(fan_in) + 2) * eps32 * (|A| |x| + |c|)`` (the
    probabilistic rounding-error model of Higham & Mary). ``ratio_noise``: relative noise of a
    feature recovered as a gradient ratio, in units of eps32. ``pattern_iters``: activation-pattern
    iterations for pooled blocks. ``forward_tol``: relative mismatch allowed when the rebuilt input is
    pushed forward to the features. ``fallback``: ``"features"`` (feature matching) or ``"none"``.
    """

    head: ExclusivityOptions = field(default_factory=ExclusivityOptions)
    max_error: float = 1.0
    rounding: float = 1.0
    ratio_noise: float = 8.0
    pattern_iters: int = 30
    forward_tol: float = 1e-5
    gordan: bool = True
    fallback: str = "features"
    fallback_steps: int = 300
    fallback_lr: float = 0.05
    fallback_tv: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        validate_fields(self)  # types and signs first, then the checks below
        if self.fallback not in ("features", "none"):
            raise FedleakError(f"fallback must be 'features' or 'none', got {self.fallback!r}")
        if not self.max_error > 0:
            raise FedleakError(f"max_error must be positive, got {self.max_error}")


# -------------------------------------------------------------------------------------------------------
# Solving one block for its input


@dataclass(frozen=True)
class BlockSolve:
    """Outcome of inverting one conv block for one sample.

    ``x``: the block's input (flattened, float64) or None; ``unique``: uniqueness proven; ``bound``:
    proven 2-norm error bound of ``x`` (inf when not proven); ``sigma``: proven lower bound on the
    smallest singular value of the system; ``rows``/``unknowns``: size of the system used.
    """

    x: np.ndarray | None
    unique: bool
    bound: float
    sigma: float
    rows: int
    unknowns: int
    reason: str


def _rounding(A: sp.csr_matrix, c: np.ndarray, x: np.ndarray, opts: ConvExclusivityOptions) -> np.ndarray:
    """Per-unit bound on the client's float32 rounding of ``A x + c`` (deterministic dot-product model)."""
    fan_in = np.diff(A.indptr).max() if A.nnz else 1
    gamma = opts.rounding * (math.sqrt(fan_in) + 2) * EPS32
    return gamma * (abs(A) @ np.abs(x) + np.abs(c))


def _gordan(J: sp.csr_matrix) -> tuple[np.ndarray | None, float]:
    """Find ``lambda >= 1`` with ``J^T lambda = 0`` (rows of J positively span the input space).

    Returns (lambda, ||J^T lambda||_2) or (None, inf) when the LP finds none."""
    m, n = J.shape
    if m <= n:
        return None, float("inf")
    res = linprog(np.ones(m), A_eq=J.T.tocsr(), b_eq=np.zeros(n), bounds=(1.0, None), method="highs")
    if res.status != 0 or res.x is None:
        return None, float("inf")
    lam = np.asarray(res.x)
    return lam, float(np.linalg.norm(J.T @ lam))


def invert_block(blk: ConvBlock, out: np.ndarray, out_err: np.ndarray, opts: ConvExclusivityOptions,
                 out_err2: float = 0.0) -> BlockSolve:
    """Solve ``blk(x) = out`` for the block's input ``x`` when the observed units determine it.

    The error of ``out`` is bounded per unit by ``out_err`` (float32 noise) plus a vector of 2-norm at
    most ``out_err2`` (propagated from the block above). The result's ``bound`` is a 2-norm error bound
    of ``x`` (rigorous given the float32 noise model of :class:`ConvExclusivityOptions`).
    """
    A, c = blk.affine
    n = blk.in_dim
    if blk.pool is None:
        # surely active units; when the propagated error is too large to tell, rows are picked with a practical
        # threshold and the solve is kept (for the fallback) but not proven
        practical = 1e-6 * float(np.abs(out).max(initial=0.0))
        sure = out_err2 <= max(practical, 1e-300) or out_err2 == 0.0
        rows = np.nonzero(out > out_err + (out_err2 if sure else practical))[0]
        if len(rows) < n:
            return BlockSolve(None, False, math.inf, 0.0, len(rows), n,
                              f"{len(rows)} surely active units for {n} unknowns (underdetermined)")
        J = A[rows]
        rhs = out[rows] - c[rows]
        gram = blk.gram
        if gram is not None:
            w = np.zeros(A.shape[0])
            w[rows] = 1.0
            system = normal_equations(J, gram.order, gram.band(w), gram.max_terms)
        else:
            system = normal_equations(J, pixel_major_order(blk.in_shape))
        x = system.lstsq(rhs)
        if x is None:
            return BlockSolve(None, False, math.inf, 0.0, len(rows), n, "the active units are rank deficient")
        sigma = system.sigma_lower()
        noise = float(np.linalg.norm(out_err[rows] + _rounding(J, c[rows], x, opts))) + out_err2
        resid = float(np.linalg.norm(J @ x - rhs))
        # any input x* reproducing out satisfies J x* = rhs - noise; ||x - x*|| <= (resid + noise) / sigma
        proven = sigma > 0 and (sure or bool((out[rows] > out_err[rows] + out_err2).all()))
        bound = (resid + noise) / sigma if proven else math.inf
        reason = ("solved from the active units" if proven else
                  "no proven lower bound on sigma_min" if sigma <= 0 else
                  "solved, but the error from the layer above leaves the active set unproven")
        return BlockSolve(x, proven, bound, sigma, len(rows), n, reason)
    # ---- pooled block: iterate the activation pattern, then prove uniqueness (convexity + Gordan) -----------
    win = blk.pool_windows
    practical = 1e-6 * float(np.abs(out).max(initial=0.0))
    pos = out > out_err + min(out_err2, practical)
    if int(pos.sum()) <= n:
        return BlockSolve(None, False, math.inf, 0.0, int(pos.sum()), n,
                          f"{int(pos.sum())} non-zero pooled units for {n} unknowns (underdetermined)")
    q_idx = np.nonzero(pos)[0]
    x = None
    if blk.pool.kind == "avg":
        active = np.zeros(blk.conv_dim, dtype=bool)
        active[win[q_idx].ravel()] = True  # first guess: every unit of a non-zero window fires
        pick = None
    else:
        active = None
        pick = win[q_idx, 0]  # first guess of each window's max unit
    J = rhs = None
    for _ in range(opts.pattern_iters):
        if blk.pool.kind == "avg":
            D = sp.diags(active.astype(np.float64))
            J = (blk.pool_matrix[q_idx] @ D @ A).tocsr()
            rhs = out[q_idx] - blk.pool_matrix[q_idx] @ (active * c)
        else:
            J = A[pick]
            rhs = out[q_idx] - c[pick]
        system = normal_equations(J, pixel_major_order(blk.in_shape))
        x = system.lstsq(rhs)
        if x is None:
            return BlockSolve(None, False, math.inf, 0.0, len(q_idx), n, "the pooled system is rank deficient")
        z = A @ x + c
        if blk.pool.kind == "avg":
            new = z > 0
            if np.array_equal(new, active):
                break
            active = new
        else:
            zz = np.maximum(z, 0)[win[q_idx]]
            new = win[q_idx, np.argmax(zz, axis=1)]
            if np.array_equal(new, pick):
                break
            pick = new
    else:
        return BlockSolve(None, False, math.inf, 0.0, len(q_idx), n, "the activation pattern did not settle")
    fwd = blk.forward(torch.from_numpy(x)[None], F64).reshape(-1).numpy()
    res_all = np.abs(fwd - out)
    if float(res_all.max()) > opts.forward_tol * max(float(np.abs(out).max()), 1e-300) + float(out_err.max()) + min(out_err2, practical):
        return BlockSolve(None, False, math.inf, 0.0, len(q_idx), n, "the solved input does not reproduce the block output")
    sigma = system.sigma_lower()
    if not opts.gordan or sigma <= 0 or not np.isfinite(out_err2):
        return BlockSolve(x, False, math.inf, sigma, len(q_idx), n, "pooled block solved, uniqueness not proven")
    lam, vnorm = _gordan(system.J)
    if lam is None or vnorm >= sigma:
        return BlockSolve(x, False, math.inf, sigma, len(q_idx), n,
                          "pooled block solved, but its rows do not positively span the input space (uniqueness unproven)")
    rnd = _rounding(A, c, x, opts)
    rnd_q = (blk.pool_matrix[q_idx] @ rnd) if blk.pool.kind == "avg" else rnd[pick]
    rho = res_all[q_idx] + out_err[q_idx] + rnd_q
    # the propagated error (2-norm <= out_err2) enters through rows of the pooling map (norm <= 1)
    prop = (math.sqrt(len(rho)) + float(np.linalg.norm(lam))) * out_err2
    bound = (float(rho.sum()) + float(lam @ rho) + prop) / (sigma - vnorm)
    return BlockSolve(x, True, bound, sigma, len(q_idx), n, "pooled block solved; uniqueness proven (Gordan)")


@dataclass(frozen=True)
class ChainSolve:
    """Inverting all conv blocks of one sample, top down. ``inputs[i]`` is block i's solved input."""

    x: np.ndarray | None
    blocks: tuple[BlockSolve, ...]  # top block first
    bound: float
    lowest_known: int  # index of the lowest block whose *input* is known (len(blocks) if none)
    known: np.ndarray  # that input (or the features)

    @property
    def unique(self) -> bool:
        return self.x is not None and all(b.unique for b in self.blocks)


def invert_chain(net: ReluCNN, features: np.ndarray, feat_err: np.ndarray, opts: ConvExclusivityOptions) -> ChainSolve:
    """Invert every conv block of ``net`` from the flattened ``features`` (per-unit error ``feat_err``)."""
    out, err, err2 = features, feat_err, 0.0
    solves: list[BlockSolve] = []
    bound = float(np.linalg.norm(feat_err))
    lowest, known = len(net.blocks), features
    for i in range(len(net.blocks) - 1, -1, -1):
        s = invert_block(net.blocks[i], out, err, opts, err2)
        solves.append(s)
        if s.x is None:
            return ChainSolve(None, tuple(solves), math.inf, lowest, known)
        lowest, known = i, s.x
        bound = s.bound if s.unique else math.inf
        out = s.x
        # below, the known output carries the proven 2-norm error of this solve (when unproven, the lower
        # blocks are still solved for the fallback, but nothing below can be proven)
        err, err2 = np.zeros(len(out)), (bound if np.isfinite(bound) else math.inf)
    return ChainSolve(out, tuple(solves), bound, 0, out)


# -------------------------------------------------------------------------------------------------------
# Fallback: feature matching


def feature_matching(net: ReluCNN, targets: list[tuple[int, np.ndarray]], opts: ConvExclusivityOptions) -> torch.Tensor:
    """Rebuild inputs whose lower blocks are underdetermined: for each (level, a) find x in [0, 1] with
    ``blocks[:level](x)`` close to the known activation ``a`` (Adam on a sigmoid parametrisation with a
    total-variation prior; samples of one level are optimised together). Uncertified by construction."""
    gen = torch.Generator().manual_seed(opts.seed)
    shape = net.input_shape
    out = torch.empty(len(targets), *shape)
    for level in sorted({lv for lv, _ in targets}):
        idx = [k for k, (lv, _) in enumerate(targets) if lv == level]
        tgt = torch.stack([torch.from_numpy(targets[k][1]).to(torch.float32) for k in idx])
        scale = tgt.pow(2).sum(1).clamp_min(1e-12)
        w = torch.nn.Parameter(0.1 * torch.randn(len(idx), *shape, generator=gen))
        optim = torch.optim.Adam([w], lr=opts.fallback_lr)
        for _ in range(opts.fallback_steps):
            optim.zero_grad()
            x = torch.sigmoid(w)
            h = x
            for blk in net.blocks[:level]:
                h = blk.forward(h, torch.float32)
            loss = ((h.reshape(len(idx), -1) - tgt).pow(2).sum(1) / scale).sum()
            tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
            (loss + opts.fallback_tv * len(idx) * tv).backward()
            optim.step()
        out[idx] = torch.sigmoid(w.detach())
    return out


# -------------------------------------------------------------------------------------------------------
# The attack


def _options(options: ConvExclusivityOptions | None, overrides: dict) -> ConvExclusivityOptions:
    opts = options or ConvExclusivityOptions()
    head_keys = {f.name for f in fields(ExclusivityOptions)}
    conv_keys = {f.name for f in fields(ConvExclusivityOptions)}
    unknown = set(overrides) - head_keys - conv_keys
    if unknown:
        raise FedleakError(f"unknown option(s) for the conv-exclusivity attack: {sorted(unknown)}")
    head = overrides.pop("head", opts.head)
    head = replace(head, **{k: v for k, v in overrides.items() if k in head_keys and k not in conv_keys})
    return replace(opts, head=head, **{k: v for k, v in overrides.items() if k in conv_keys})


def _full_gradient(model: nn.Module, X: torch.Tensor, y: torch.Tensor, dtype) -> dict[str, torch.Tensor]:
    """Sum over samples of the per-sample cross-entropy gradients (real autograd) in ``dtype``."""
    params = dict(model.named_parameters())
    cast = {k: v.detach().to(dtype).requires_grad_(True) for k, v in params.items()}
    buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.named_buffers()}
    logits = torch.func.functional_call(model, {**cast, **buffers}, (X.to(dtype),))
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    grads = torch.autograd.grad(loss, list(cast.values()))
    return {k: g.detach() for k, g in zip(cast, grads)}


@register_attack("conv-exclusivity", update_kinds=("gradient",),
                 description="certified exclusivity reconstruction through conv layers (CNNs: FC head, then conv inversion)")
def conv_exclusivity_attack(
    model: nn.Module,
    update: GradientUpdate | dict[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    options: ConvExclusivityOptions | None = None,
    **overrides,
) -> Reconstruction:
    """Rebuild every sample of a FedSGD batch on a CNN that the exclusivity conditions allow.

    ``model`` is an ``nn.Sequential`` CNN (see :func:`fedleak.models.convnet.as_relu_cnn`), ``update`` the
    mean-loss gradient keyed like ``model.named_parameters()``. Keywords are fields of
    :class:`ConvExclusivityOptions` or of :class:`ExclusivityOptions` (applied to the FC head).
    """
    start = time.perf_counter()
    opts = _options(options, dict(overrides))
    hopts = opts.head
    if hopts.clip_norm is not None:
        raise FedleakError("clip_norm is supported for MLPs only: a CNN sample's gradient norm includes its conv "
                           "layers, which the FC-head certificate does not recompute")
    net = as_relu_cnn(model, input_shape)
    grad_update = as_gradient_update(update)
    check_matches_model(model, grad_update.gradients, "gradient")
    obs_dtype = next(iter(grad_update.gradients.values())).dtype
    grads = dict(grad_update.gradients)
    attack = ExclusivityAttack(net.head, grads, hopts, obs_dtype)
    notes = attack.notes

    # 1. FC head: labels and feature vectors
    cands = unique_candidates(attack.top_candidates(), net.head.depth - 1, hopts.group_tol)
    attack.walk_down(cands)
    complete = [c for c in cands if c.complete]
    if len(cands) > len(complete):
        notes.append(f"{len(cands) - len(complete)} sample(s) were found in the FC head but their features could "
                     "not be traced to the first Linear layer")
    # keep candidates the head certificate accepts, or whose witnesses sit at the batch's common scale
    # (single-ExAN samples the whole-batch certificate may still certify); mixtures of samples are dropped
    if complete:
        pre = attack.certify(complete, grad_update.num_examples)
        keep = [c for c, r in zip(complete, pre.recoveries) if r.certified or (
            pre.factor is not None and r.witnesses[-1] >= 1 and np.isfinite(r.scale)
            and abs(r.scale / pre.factor - 1) <= hopts.scale_tol)]
        if len(keep) < len(complete):
            notes.append(f"{len(complete) - len(keep)} FC-head candidate(s) failed the head certificate (mixtures) "
                         "and were dropped")
        complete = keep

    # 2. conv blocks, top down
    eps_obs = float(torch.finfo(obs_dtype).eps) if obs_dtype != F64 else EPS32
    chains: list[ChainSolve] = []
    for c in complete:
        f = c.acts[0].numpy()
        chains.append(invert_chain(net, f, opts.ratio_noise * eps_obs * np.abs(f), opts))

    shape = net.input_shape
    X = torch.zeros(len(complete), *shape, dtype=F64)
    solved = [ch.x is not None for ch in chains]
    for k, ch in enumerate(chains):
        if ch.x is not None:
            X[k] = torch.from_numpy(ch.x).reshape(shape)
    # 3. certificate: recompute the head certificate from the rebuilt inputs' own features
    feats64 = net.features(X, F64) if len(complete) else torch.empty(0, net.feature_dim, dtype=F64)
    feats32 = net.features(X.to(torch.float32), torch.float32).to(F64) if len(complete) else feats64
    fwd_ok = []
    for k, c in enumerate(complete):
        ok = False
        if solved[k]:
            ref = c.acts[0]
            tol = opts.forward_tol * float(ref.norm().clamp_min(1e-300))
            ok = float((feats64[k] - ref).norm()) <= tol and float((feats32[k] - ref).norm()) <= tol
            c.acts[0] = feats64[k].clone()
        fwd_ok.append(ok)
    head = attack.certify(complete, grad_update.num_examples)
    head_recs, batch_size = head.recoveries, head.batch_size

    # 4. fallback for underdetermined chains
    fb_idx = [k for k, ok in enumerate(solved) if not ok]
    if fb_idx and opts.fallback == "features":
        targets = [(chains[k].lowest_known, chains[k].known) for k in fb_idx]
        X_fb = feature_matching(net, targets, opts)
        for j, k in enumerate(fb_idx):
            X[k] = X_fb[j].to(F64)

    records: list[SampleRecovery] = []
    certified: list[bool] = []
    for k, (c, ch, hr) in enumerate(zip(complete, chains, head_recs)):
        conv_solved = tuple(len(net.blocks) - i for i, b in enumerate(ch.blocks) if b.unique)
        failing = next((b for b in ch.blocks if not b.unique), None)
        names = [net.blocks[len(net.blocks) - 1 - i].name for i in range(len(ch.blocks))]
        if not solved[k] or failing is not None:
            bad = names[[b.unique for b in ch.blocks].index(False)]
            how = ("rebuilt analytically (uncertified)" if solved[k] else
                   "rebuilt by feature matching (uncertified)" if opts.fallback == "features" else "not rebuilt")
            ok, reason = False, f"conv layer '{bad}': {failing.reason}; {how}"
        elif ch.bound > opts.max_error:
            ok, reason = False, f"the proven error bound {ch.bound:.2e} of the rebuilt input exceeds max_error {opts.max_error:g}"
        elif not fwd_ok[k]:
            ok, reason = False, "the rebuilt input does not reproduce the recovered features"
        elif not hr.certified:
            ok, reason = False, f"FC head: {hr.reason}"
        else:
            ok, reason = True, (f"FC head witnesses match the rebuilt input's gradient; conv layers solved uniquely "
                                f"(error bound {ch.bound:.1e})")
        certified.append(ok)
        records.append(SampleRecovery(label=c.label, certified=ok, reason=reason, witnesses=hr.witnesses,
                                      solved_layers=conv_solved, residual=ch.bound, scale=hr.scale))

    y = torch.tensor([c.label for c in complete], dtype=torch.long)
    batch_ok = False
    exact_idx = [k for k in range(len(complete)) if solved[k] and chains[k].unique and chains[k].bound <= opts.max_error
                 and fwd_ok[k]]
    if complete and batch_size is not None and len(exact_idx) == batch_size == len(complete):
        obs = {k: v.to(F64) for k, v in grads.items()}
        pred = _full_gradient(model, X, y, F64)
        factor = 1.0 / batch_size if hopts.known_scale else float(
            sum((pred[k] * obs[k]).sum() for k in obs) / sum((pred[k] * pred[k]).sum() for k in obs))
        worst = max(float((factor * pred[k] - obs[k]).norm() / obs[k].norm().clamp_min(1e-300)) for k in obs)
        if worst <= hopts.batch_tol:
            batch_ok = True
            for k in exact_idx:
                if not certified[k]:
                    r = records[k]
                    records[k] = replace(r, certified=True,
                                         reason="the rebuilt batch reproduces the whole observed gradient (conv layers solved uniquely)")
                    certified[k] = True
        else:
            notes.append(f"the rebuilt batch leaves a relative gradient residual of {worst:.2e}")

    probs = (torch.softmax(forward_head_logits(net, feats64), 1) if complete
             else torch.empty(0, net.num_classes, dtype=F64))
    sure = torch.tensor(certified, dtype=torch.bool)  # only certified labels are known
    counts = (estimate_label_counts(net.head, attack.g[-1], batch_size, probs[sure], y[sure]) if hopts.known_scale
              else None)
    out_dtype = net.blocks[0].conv.module.weight.dtype
    return Reconstruction(
        inputs=X.to(out_dtype),
        labels=y,
        certified=torch.tensor(certified, dtype=torch.bool),
        attack="conv-exclusivity",
        samples=tuple(records),
        batch_size=batch_size,
        label_counts=counts,
        batch_certified=batch_ok,
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
    )


def forward_head_logits(net: ReluCNN, feats: torch.Tensor) -> torch.Tensor:
    from fedleak.analysis.forward import forward_trace

    return forward_trace(net.head, feats, dtype=F64).logits
