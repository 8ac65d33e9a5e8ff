"""Step 3 for networks with conv blocks: walk the rebuilt features down the conv blocks (algorithms spec §2.6;
docs/cnn.md has the details and the certifiable condition).

A block computes ``out = pool(relu(A x + c))`` (``A``: unrolled sparse conv, eval-mode BN folded). Without
pooling, every unit with ``out_u > 0`` gives the exact equation ``A_u x + c_u = out_u``; when these rows have
full column rank the input is unique and solved by least squares. With average or max pooling the map is
*convex* in ``x`` (a non-negative sum / a max of ReLUs of affine functions); the input is found by iterating
the activation pattern, and it is proven unique by a Gordan-type certificate: a strictly positive ``lambda``
with ``J^T lambda = 0`` for the Jacobian (a subgradient) ``J`` at the solution, plus full column rank of ``J``
(an LP and a Cholesky factorisation). Every solve comes with a rigorous 2-norm error bound from a *proven*
lower bound on ``sigma_min`` (band Cholesky of ``J^T J - tau I``: one float32 factorisation per block and sample,
:mod:`fedleak.nets.conv_solve`, float64 where float32 cannot prove it, :mod:`fedleak.attacks.normal_equations`) and
the float32 noise of the known output; the bounds are chained down to the input (:func:`invert_chain`).

Where a block is underdetermined, the input is rebuilt by :func:`feature_matching` (Adam with a
total-variation prior, matching the lowest activation known exactly) and is never certified.

The linear algebra runs in numpy/scipy on the CPU; forward passes through the blocks run on the network's
device.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch

from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.normal_equations import BAND_WORK, normal_equations
from fedleak.nets import ConvBlock, Network
from fedleak.nets.cast import unchanged
from fedleak.nets.conv_gram import pixel_major_order
from fedleak.nets.conv_solve import normal_product, plain_lstsq, proven_lstsq, proven_sigma64
from fedleak.nets.scratch import reused_arrays
from fedleak.threads import blas_threads

F64 = torch.float64
EPS32 = float(np.finfo(np.float32).eps)
TIGHT_REACH = 0.5 * 1.25  # the float64 proof's sigma^2 as a fraction of the estimated lambda_min, generously
POOL_WORK = 5e9  # band-Cholesky flops of a batch above which its chains are solved in worker processes (~0.3 s)
UNASKED = "solved without a proof (none was asked for)"


# -------------------------------------------------------------------------------------------------------
# Solving one block for its input


@dataclass(frozen=True)
class BlockSolve:
    """Outcome of inverting one conv block for one sample.

    ``x``: the block's input (flattened, float64) or None; ``unique``: uniqueness proven; ``bound``:
    proven 2-norm error bound of ``x`` (inf when not proven); ``sigma``: proven lower bound on the
    smallest singular value of the system; ``rows``/``unknowns``: size of the system used; ``lam``: an estimate
    of the system's smallest eigenvalue of ``J^T J`` (nan when none), the hint for the next sample's system;
    ``active``: the units whose equations were used (unpooled blocks); ``residual``: the numerator of ``bound``
    (``||J x - rhs||`` plus the noise), so that a tighter ``sigma`` gives ``bound = residual / sigma``;
    ``margin``: how far the used units are above their noise, the propagated error below which they are all
    proven active (unpooled blocks); ``float64``: ``sigma`` was proven in float64 (no tighter proof to try).
    """

    x: np.ndarray | None
    unique: bool
    bound: float
    sigma: float
    rows: int
    unknowns: int
    reason: str
    lam: float = math.nan
    active: np.ndarray | None = None
    residual: float = math.inf
    margin: float = 0.0
    float64: bool = False


def rounding_bound(blk: ConvBlock, x: np.ndarray, opts: ExclusivityOptions, rows: np.ndarray | None = None
                   ) -> np.ndarray:
    """Per-unit bound on the client's float32 rounding of ``A x + c`` (deterministic dot-product model), on the
    units ``rows`` (all by default); ``|A| |x|`` by a conv with the absolute kernel."""
    A, c = blk.affine
    rows = slice(None) if rows is None else rows
    fan_in = np.diff(A.indptr)[rows].max(initial=1) if A.nnz else 1
    gamma = opts.rounding * (math.sqrt(fan_in) + 2) * EPS32
    return gamma * (blk.unrolled_times(np.abs(x), absolute=True)[rows] + np.abs(c[rows]))


def gordan(J: sp.csr_matrix) -> tuple[np.ndarray | None, float]:
    """Find ``lambda >= 1`` with ``J^T lambda = 0`` (rows of J positively span the input space).

    Returns (lambda, ||J^T lambda||_2) or (None, inf) when the LP finds none."""
    from scipy.optimize import linprog  # scipy.optimize takes half a second to import: only when a CNN needs it

    m, n = J.shape
    if m <= n:
        return None, float("inf")
    res = linprog(np.ones(m), A_eq=J.T.tocsr(), b_eq=np.zeros(n), bounds=(1.0, None), method="highs")
    if res.status != 0 or res.x is None:
        return None, float("inf")
    lam = np.asarray(res.x)
    return lam, float(np.linalg.norm(J.T @ lam))


def solve_active(blk: ConvBlock, rows: np.ndarray, rhs: np.ndarray, hint: float | None, tight: bool = False,
                 prove: bool = True) -> tuple[np.ndarray | None, float, float, bool]:
    """Least squares ``J x = rhs``, ``J = A[rows]`` the block's active rows, with a proven lower bound on
    ``sigma_min(J)``: one float32 factorisation (:func:`fedleak.nets.conv_solve.proven_lstsq`, products with ``J``
    by convs) where it gives the proof, or the float32 solve proven in float64; float64 throughout
    (:mod:`fedleak.attacks.normal_equations`, ``J`` formed) where neither works or when ``tight`` (its bound is
    tighter). Without ``prove`` the system is only solved (:func:`fedleak.nets.conv_solve.plain_lstsq`) and
    ``sigma`` is 0. Returns ``(x, sigma, lambda_min estimate, whether sigma was proven in float64)``."""
    gram = blk.gram
    if gram is None or gram.n * gram.bandwidth ** 2 > BAND_WORK:
        system = normal_equations(blk.affine[0][rows], pixel_major_order(blk.in_shape))
    else:
        w = np.zeros(blk.conv_dim)
        w[rows] = 1.0
        with blas_threads(1):
            ab = gram.band(w)
        fast = None
        if not tight:
            v = np.zeros(blk.conv_dim)
            v[rows] = rhs
            matvec = normal_product(ab, gram.order, blk.folded(F64)[0].cpu(), blk.in_shape, blk.conv.geometry, w)
            if not prove:
                x = plain_lstsq(ab, gram.order, matvec, blk.unrolled_transpose_times(v))
                if x is not None:
                    return x, 0.0, math.nan, False
            else:
                fast = proven_lstsq(ab, gram.order, gram.max_terms, matvec, blk.unrolled_transpose_times(v), hint)
        if fast is not None:
            return fast.x, fast.sigma, fast.lam, fast.float64
        system = normal_equations(blk.affine[0][rows], gram.order, ab, gram.max_terms)
    x = system.lstsq(rhs)
    return x, (system.sigma_lower() if x is not None and prove else 0.0), math.nan, prove


def _proven_rows(blk: ConvBlock, out: np.ndarray, out_err: np.ndarray, opts: ExclusivityOptions, out_err2: float,
                 hint: float | None, tight: bool) -> tuple[BlockSolve | None, str]:
    """:func:`invert_block` of an unpooled block from the units whose value exceeds its float32 noise plus the whole
    error propagated from the block above (``out_err2``, a 2-norm): each is active for every input the observed
    output may come from, so its equation holds for it. ``(None, why)`` where they are too few, rank deficient or
    leave ``sigma_min`` unproven (the caller then solves from more units, unproven)."""
    n = blk.in_dim
    rows = np.nonzero(out > out_err + out_err2)[0]
    why = (f"the error from the layer above ({out_err2:.1e}) leaves {len(rows)} units proven active for {n} "
           "unknowns, which")
    if len(rows) < n:
        return None, f"{why} are too few"
    c = blk.affine[1]
    rhs = out[rows] - c[rows]
    x, sigma, lam, precise = solve_active(blk, rows, rhs, hint, tight, True)
    if x is None or sigma <= 0:
        failed = "rank deficient" if x is None else "sigma_min unproven"
        return None, f"{why} do not determine its input provably ({failed})"
    noise = float(np.linalg.norm(out_err[rows] + rounding_bound(blk, x, opts, rows))) + out_err2
    resid = float(np.linalg.norm(blk.unrolled_times(x)[rows] - rhs))
    margin = float((out[rows] - out_err[rows]).min(initial=math.inf))
    return BlockSolve(x, True, (resid + noise) / sigma, sigma, len(rows), n, "solved from the proven active units",
                      lam, rows, resid + noise, margin, precise), ""


def invert_block(blk: ConvBlock, out: np.ndarray, out_err: np.ndarray, opts: ExclusivityOptions,
                 out_err2: float = 0.0, hint: float | None = None, tight: bool = False, prove: bool = True
                 ) -> BlockSolve:
    """Solve ``blk(x) = out`` for the block's input ``x`` when the observed units determine it.

    The error of ``out`` is bounded per unit by ``out_err`` (float32 noise) plus a vector of 2-norm at
    most ``out_err2`` (propagated from the block above). The result's ``bound`` is a 2-norm error bound
    of ``x`` (rigorous given the float32 noise model of :class:`ExclusivityOptions`). ``hint``: the ``lam`` of
    the same block's solve for another sample of the batch (it saves a factorisation; never changes the proof).
    ``tight``: prove ``sigma_min`` in float64 (slower, a tighter bound: see :func:`solve_active`). Without
    ``prove`` the input is solved for (the same least squares, the same active units) but nothing is proven.
    """
    A, c = blk.affine
    n = blk.in_dim
    if blk.pool is None:
        # surely active units; when the propagated error is too large to tell, the units above it alone (proven
        # active) are solved and proven where they determine the input, else rows are picked with a practical
        # threshold and the solve is kept (for the fallback) but not proven
        practical = 1e-6 * float(np.abs(out).max(initial=0.0))
        sure = out_err2 <= max(practical, 1e-300) or out_err2 == 0.0
        unproven = "the error from the layer above leaves the active set unproven"
        if not sure and prove and math.isfinite(out_err2):
            proven, why = _proven_rows(blk, out, out_err, opts, out_err2, hint, tight)
            if proven is not None:
                return proven
            unproven = why
        rows = np.nonzero(out > out_err + (out_err2 if sure else practical))[0]
        if len(rows) < n:
            return BlockSolve(None, False, math.inf, 0.0, len(rows), n,
                              f"underdetermined: {len(rows)} equations (surely active units) for {n} unknowns")
        rhs = out[rows] - c[rows]
        x, sigma, lam, precise = solve_active(blk, rows, rhs, hint, tight, prove)
        if x is None:
            return BlockSolve(None, False, math.inf, 0.0, len(rows), n, "the active units are rank deficient")
        noise = float(np.linalg.norm(out_err[rows] + rounding_bound(blk, x, opts, rows))) + out_err2
        resid = float(np.linalg.norm(blk.unrolled_times(x)[rows] - rhs))
        # any input x* reproducing out satisfies J x* = rhs - noise; ||x - x*|| <= (resid + noise) / sigma
        proven = sigma > 0 and (sure or bool((out[rows] > out_err[rows] + out_err2).all()))
        bound = (resid + noise) / sigma if proven else math.inf
        reason = ("solved from the active units" if proven else UNASKED if not prove else
                  "no proven lower bound on sigma_min" if sigma <= 0 else
                  f"solved, but {unproven}")
        margin = float((out[rows] - out_err[rows]).min(initial=math.inf))
        return BlockSolve(x, proven, bound, sigma, len(rows), n, reason, lam, rows, resid + noise, margin, precise)
    # ---- pooled block: iterate the activation pattern, then prove uniqueness (convexity + Gordan) -----------
    win = blk.pool_windows
    practical = 1e-6 * float(np.abs(out).max(initial=0.0))
    pos = out > out_err + min(out_err2, practical)
    if int(pos.sum()) <= n:
        return BlockSolve(None, False, math.inf, 0.0, int(pos.sum()), n,
                          f"underdetermined after {blk.pool.text}: {int(pos.sum())} equations "
                          f"(non-zero pooled units) for {n} unknowns")
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
    fwd = blk.forward(torch.from_numpy(x)[None].to(blk.conv.held_weight.device), F64).reshape(-1).cpu().numpy()
    res_all = np.abs(fwd - out)
    if float(res_all.max()) > (opts.forward_tol * max(float(np.abs(out).max()), 1e-300) + float(out_err.max())
                               + min(out_err2, practical)):
        return BlockSolve(None, False, math.inf, 0.0, len(q_idx), n,
                          "the solved input does not reproduce the block output")
    if not prove:
        return BlockSolve(x, False, math.inf, 0.0, len(q_idx), n, f"pooled block {UNASKED}")
    sigma = system.sigma_lower()
    if not opts.gordan or sigma <= 0 or not np.isfinite(out_err2):
        return BlockSolve(x, False, math.inf, sigma, len(q_idx), n, "pooled block solved, uniqueness not proven")
    lam, vnorm = gordan(system.J)
    if lam is None or vnorm >= sigma:
        return BlockSolve(x, False, math.inf, sigma, len(q_idx), n,
                          "pooled block solved, but its rows do not positively span the input space "
                          "(uniqueness unproven)")
    rnd = rounding_bound(blk, x, opts)
    rnd_q = (blk.pool_matrix[q_idx] @ rnd) if blk.pool.kind == "avg" else rnd[pick]
    rho = res_all[q_idx] + out_err[q_idx] + rnd_q
    # the propagated error (2-norm <= out_err2) enters through rows of the pooling map (norm <= 1)
    prop = (math.sqrt(len(rho)) + float(np.linalg.norm(lam))) * out_err2
    bound = (float(rho.sum()) + float(lam @ rho) + prop) / (sigma - vnorm)
    return BlockSolve(x, True, bound, sigma, len(q_idx), n, "pooled block solved; uniqueness proven (Gordan)")


def reprove(blk: ConvBlock, solve: BlockSolve) -> BlockSolve | None:
    """``solve`` (an unpooled block solved from its surely active units with a float32 proof) with ``sigma``
    proven again in float64 (:func:`fedleak.nets.conv_solve.proven_sigma64`): the same system and solution, a
    tighter error bound; ``solve`` itself where its ``sigma`` was proven in float64 already. None when there is
    nothing to re-prove or float64 does not prove more."""
    if solve.float64:
        return solve
    gram = blk.gram
    if (blk.pool is not None or gram is None or not solve.unique or solve.active is None
            or not math.isfinite(solve.lam)):
        return None
    w = np.zeros(blk.conv_dim)
    w[solve.active] = 1.0
    with blas_threads(1):
        ab = gram.band(w)
    sigma = proven_sigma64(ab, gram.max_terms, solve.lam)
    if sigma is None or sigma <= solve.sigma:
        return None
    return replace(solve, sigma=sigma, bound=solve.residual / sigma, lam=math.nan)


@dataclass(frozen=True)
class ChainSolve:
    """Inverting all conv blocks of one sample, top down. ``inputs[i]`` is block i's solved input."""

    x: np.ndarray | None
    blocks: tuple[BlockSolve, ...]  # top block first
    bound: float
    lowest_known: int  # index of the lowest block whose *input* is known (len(blocks) if none)
    known: np.ndarray  # that input (or the features)
    prove: bool = True  # whether proofs were sought (False: solved only, see :func:`invert_chain`)

    @property
    def unique(self) -> bool:
        return self.x is not None and all(b.unique for b in self.blocks)


def invert_chain(net: Network, features: np.ndarray, feat_err: np.ndarray, opts: ExclusivityOptions,
                 previous: ChainSolve | None = None, prove: bool = True) -> ChainSolve:
    """Invert every conv block of ``net`` from the flattened ``features`` (per-unit error ``feat_err``);
    ``previous``: another sample's chain on the same network, whose spectra hint this one's. Without ``prove``
    (a sample nothing can certify) every block is solved as it would be, without its proof. A chain the fast
    float32 proofs leave unproven is solved once more with float64 proofs, whose tighter bounds on
    ``sigma_min`` may carry the proof down to the input (the top block's system is the same: its solution is
    kept and only its ``sigma`` proven again, :func:`reprove`). It is not tried where it cannot help: when the
    block below the top one is the unproven one and even ``sigma = sqrt(lambda_min / 2)`` (about the most the
    float64 proof gives) would leave its error above that block's margin."""
    if not prove:
        return solve_chain(net, features, feat_err, opts, prove=False)
    chain = solve_chain(net, features, feat_err, opts, previous)
    if chain.x is None or math.isfinite(chain.bound) or len(net.blocks) < 2:
        return chain
    top, below = chain.blocks[0], chain.blocks[1]
    if top.unique and not below.unique and math.isfinite(top.lam) and top.lam > 0 and \
            top.residual / math.sqrt(TIGHT_REACH * top.lam) >= below.margin:
        return chain
    tight = solve_chain(net, features, feat_err, opts, previous, tight=True, top=chain.blocks[0])
    return tight if math.isfinite(tight.bound) else chain


def solve_chain(net: Network, features: np.ndarray, feat_err: np.ndarray, opts: ExclusivityOptions,
                previous: ChainSolve | None = None, tight: bool = False, top: BlockSolve | None = None,
                prove: bool = True) -> ChainSolve:
    """:func:`invert_chain`'s one pass over the blocks, top to bottom; ``top``: the top block's solve from the
    fast pass, re-proven in float64 by the tight pass instead of solved again."""
    out, err, err2 = features, feat_err, 0.0
    solves: list[BlockSolve] = []
    bound = float(np.linalg.norm(feat_err))
    lowest, known = len(net.blocks), features
    hints = [] if previous is None else [b.lam for b in previous.blocks]
    for i in range(len(net.blocks) - 1, -1, -1):
        j = len(net.blocks) - 1 - i
        s = reprove(net.blocks[i], top) if tight and j == 0 and top is not None else None
        if s is None:
            s = invert_block(net.blocks[i], out, err, opts, err2, hints[j] if j < len(hints) else None, tight,
                             prove)
        solves.append(s)
        if s.x is None:
            return ChainSolve(None, tuple(solves), math.inf, lowest, known, prove)
        lowest, known = i, s.x
        bound = s.bound if s.unique else math.inf
        out = s.x
        # below, the known output carries the proven 2-norm error of this solve (when unproven, the lower
        # blocks are still solved for the fallback, but nothing below can be proven)
        err, err2 = np.zeros(len(out)), (bound if np.isfinite(bound) else math.inf)
    return ChainSolve(out, tuple(solves), bound, 0, out, prove)


def invert_chains(net: Network, features: list[np.ndarray], errors: list[np.ndarray],
                  opts: ExclusivityOptions, prove: list[bool] | None = None) -> list[ChainSolve]:
    """:func:`invert_chain` for every sample (``prove``: whether to prove each one's, all by default). The samples
    are split into contiguous runs (each proven sample's solves hint the next one's) spread over ``opts.workers``
    forked worker processes: on Linux, outside daemonic processes (which may not fork), and when the band
    factorisations are worth it (``POOL_WORK`` flops); else in this process."""
    from fedleak.fishing.pool import parallel_map, resolve_workers  # the process pool fishing uses

    workers = resolve_workers(opts.workers)
    work = len(features) * sum(b.gram.n * b.gram.bandwidth ** 2 for b in net.blocks if b.pool is None and b.gram)
    pool = workers > 1 and len(features) >= 4 * workers and work >= POOL_WORK and not mp.current_process().daemon
    runs = 2 * workers if pool else 1
    edges = np.linspace(0, len(features), runs + 1).round().astype(int)

    asked = [True] * len(features) if prove is None else prove

    def run(i: int) -> list[ChainSolve]:
        out: list[ChainSolve] = []
        hint = None
        for k in range(edges[i], edges[i + 1]):
            out.append(invert_chain(net, features[k], errors[k], opts, hint, asked[k]))
            hint = out[-1] if asked[k] else hint
        return out

    # thousands of small products: a threaded BLAS only spins (worse on a busy machine); the band arrays of one
    # sample are reused by the next (fresh pages cost up to a third of a factorisation each); the model is not
    # changed meanwhile, so the blocks' cached maps are checked against each tensor's fingerprint taken once
    with blas_threads(1), reused_arrays(), unchanged():
        return [chain for part in parallel_map(run, list(range(runs)), workers) for chain in part]


# -------------------------------------------------------------------------------------------------------
# Fallback: feature matching


def feature_matching(net: Network, targets: list[tuple[int, np.ndarray]], opts: ExclusivityOptions) -> torch.Tensor:
    """Rebuild inputs whose lower blocks are underdetermined: for each (level, a) find x in [0, 1] with
    ``blocks[:level](x)`` close to the known activation ``a`` (Adam on a sigmoid parametrisation with a
    total-variation prior; samples of one level are optimised together). Uncertified by construction."""
    gen = torch.Generator().manual_seed(opts.seed)  # drawn on the CPU: the same start on every device
    shape, dev = net.blocks[0].in_shape, net.device  # images (C, H, W), for the total-variation prior
    out = torch.empty(len(targets), *net.input_shape)
    for level in sorted({lv for lv, _ in targets}):
        idx = [k for k, (lv, _) in enumerate(targets) if lv == level]
        tgt = torch.stack([torch.from_numpy(targets[k][1]).to(torch.float32) for k in idx]).to(dev)
        scale = tgt.pow(2).sum(1).clamp_min(1e-12)
        w = torch.nn.Parameter((0.1 * torch.randn(len(idx), *shape, generator=gen)).to(dev))
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
        out[idx] = torch.sigmoid(w.detach()).cpu().reshape(len(idx), *net.input_shape)
    return out
