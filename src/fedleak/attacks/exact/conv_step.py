"""The exclusivity pipeline's step 3, for a network with conv blocks (:mod:`~fedleak.attacks.exact.pipeline`): the
head candidates the head certificate rules out (mixtures of samples) dropped, each sample's features walked down the
blocks to the input and certified on the rebuilt features, each sample's record, and the whole rebuilt batch's
gradient checked against the observed one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedleak.attacks.exact.batch_gradient import batch_gradient, gradient_residual
from fedleak.attacks.exact.candidates import Candidate
from fedleak.attacks.exact.feature_noise import rounding_reach
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.state import HeadAttack
from fedleak.nets import Network
from fedleak.reconstruction import SampleRecovery

if TYPE_CHECKING:  # the conv walk-down (scipy, 0.3 s to import) is loaded by the networks that have conv blocks
    from fedleak.attacks.exact.certificate import Certificate
    from fedleak.attacks.exact.conv_walkdown import ChainSolve

F64 = torch.float64


@dataclass
class ConvWalk:
    """The conv walk-down of every complete candidate: its chain of block solves, the rebuilt inputs (n x the
    network's input shape, float64, CPU; feature matching where the chain stopped), whether the chain reached
    the input, whether that input reproduces the features (float64 and float32), and whether the features' error
    is bounded (a weight change's rounding of them may not be: :func:`~fedleak.attacks.exact.feature_noise.
    rounding_reach`)."""

    chains: list[ChainSolve]
    inputs: torch.Tensor
    solved: list[bool]
    forward_ok: list[bool]
    bounded: list[bool]


UNBOUNDED = ("the weight change's rounding leaves its features without a proven error bound (the head's first Linear "
             "layer has no bias, or its witness rows' bias entries are within their rounding)")


def drop_mixtures(attack: HeadAttack, complete: list[Candidate], reported: int | None
                  ) -> tuple[list[Candidate], int | None]:
    """Keep the candidates the head certificate accepts, or whose witnesses sit at the batch's common scale
    (single-witness samples the whole-batch certificate may still certify); mixtures of samples are dropped.
    Returns them and the batch size the head certificate found (None: none)."""
    if not complete:
        return complete, reported
    pre = attack.certify(complete, reported)
    own = attack.opts.class_factors(torch.tensor([c.label for c in complete]))  # the labels' class weights
    keep = [c for c, r, w in zip(complete, pre.recoveries, own) if r.certified or (
        pre.factor is not None and r.witnesses[-1] >= 1 and np.isfinite(r.scale)
        and abs(r.scale / (pre.factor * w) - 1) <= attack.opts.scale_tol)]
    if len(keep) < len(complete):
        attack.notes.append(f"{len(complete) - len(keep)} head candidate(s) failed the head certificate (mixtures) "
                            "and were dropped")
    return keep, pre.batch_size


def walk_and_certify(attack: HeadAttack, net: Network, complete: list[Candidate], batch: int | None,
                     reported: int | None, obs_dtype) -> tuple[ConvWalk, Certificate]:
    """Walk the candidates down the conv blocks (:func:`walk_conv`) and certify them on their rebuilt features.

    A candidate with fewer than ``min_last`` witnesses in the head is certified only as part of the whole batch,
    which needs at least as many candidates as the batch's ``batch`` samples: where there are fewer, its conv
    blocks are solved without proofs (the same solutions; nothing is proven that nothing could use). Should the
    certificate on the rebuilt features find a batch size that does admit the whole batch, the walk is made again
    with every proof."""
    opts = attack.opts
    t = net.head.depth - 1
    whole = batch is None or len(complete) >= batch
    prove = [whole or len(c.witnesses[t]) >= opts.min_last for c in complete]
    features = [c.acts[0] for c in complete]
    reach = [rounding_reach(attack, c) for c in complete]  # a weight delta's rounding of the features
    walk = walk_conv(net, complete, opts, obs_dtype, prove, reach)
    cert = attack.certify(complete, reported)
    if not all(prove) and cert.batch_size is not None and len(complete) >= cert.batch_size:
        for c, f in zip(complete, features):
            c.acts[0] = f
        walk = walk_conv(net, complete, opts, obs_dtype, None, reach)
        cert = attack.certify(complete, reported)
    return walk, cert


def walk_conv(net: Network, complete: list[Candidate], opts: ExclusivityOptions, obs_dtype,
              prove: list[bool] | None = None, reach: list[np.ndarray | None] | None = None) -> ConvWalk:
    """Walk each candidate's features down the conv blocks (``prove``: whether to prove each one's chain, all by
    default; ``reach``: how far a weight delta's rounding can have moved each one's features, per unit, where the
    update is one: :func:`~fedleak.attacks.exact.feature_noise.rounding_reach`); the features of a sample whose
    chain reached the input become the rebuilt input's own (so the certificate reads what the input really gives)."""
    from fedleak.attacks.exact.conv_walkdown import EPS32, feature_matching, invert_chains

    eps_obs = float(torch.finfo(obs_dtype).eps) if obs_dtype != F64 else EPS32
    feats = [c.acts[0].cpu().numpy() for c in complete]
    reach = [None] * len(complete) if reach is None else reach
    bounded = [r is None or bool(np.isfinite(r).all()) for r in reach]
    errors = [opts.feature_error(f, eps_obs) + (0.0 if r is None or not b else r)
              for f, r, b in zip(feats, reach, bounded)]
    asked = [b and p for b, p in zip(bounded, prove or bounded)]  # features without a bound: nothing to prove
    chains = invert_chains(net, feats, errors, opts, asked)
    X = torch.zeros(len(complete), *net.input_shape, dtype=F64)
    solved = [ch.x is not None for ch in chains]
    for k, ch in enumerate(chains):
        if ch.x is not None:
            X[k] = torch.from_numpy(ch.x).reshape(net.input_shape)
    forward_ok = []
    if complete:
        feats64 = net.features(X, F64)
        feats32 = net.features(X.to(torch.float32), torch.float32).to(F64)
        for k, c in enumerate(complete):
            ok = False
            if solved[k]:  # within the features' own rounding, where a weight delta's is known
                ref = c.acts[0]
                own = float(np.linalg.norm(reach[k])) if reach[k] is not None and bounded[k] else 0.0
                tol = opts.forward_tol * float(ref.norm().clamp_min(1e-300)) + own
                ok = float((feats64[k] - ref).norm()) <= tol and float((feats32[k] - ref).norm()) <= tol
                c.acts[0] = feats64[k].clone()
            forward_ok.append(ok)
    stopped = [k for k, ok in enumerate(solved) if not ok]
    if stopped and opts.fallback == "features":
        found = feature_matching(net, [(chains[k].lowest_known, chains[k].known) for k in stopped], opts)
        for j, k in enumerate(stopped):
            X[k] = found[j].to(F64)
    return ConvWalk(chains, X, solved, forward_ok, bounded)


def conv_records(net: Network, complete: list[Candidate], walk: ConvWalk, head: tuple[SampleRecovery, ...],
                 opts: ExclusivityOptions) -> list[SampleRecovery]:
    """Each sample's record: the head's certificate, and the conv blocks' proof below it."""
    records = []
    n_blocks = len(net.blocks)
    for k, (c, ch, hr) in enumerate(zip(complete, walk.chains, head)):
        conv_solved = tuple(n_blocks - i for i, b in enumerate(ch.blocks) if b.unique)
        # the chain is solved top block first; one solved without proofs fails where a block is not solved
        failing = next((i for i, b in enumerate(ch.blocks) if not b.unique and (ch.prove or b.x is None)), None)
        how = ("rebuilt analytically (uncertified)" if walk.solved[k] else
               "rebuilt by feature matching (uncertified)" if opts.fallback == "features" else "not rebuilt")
        if not walk.bounded[k]:
            ok, reason = False, f"{UNBOUNDED}; {how}"
        elif failing is not None:
            layer = net.blocks[n_blocks - 1 - failing].name
            ok, reason = False, f"conv layer '{layer}': {ch.blocks[failing].reason}; {how}"
        elif not ch.prove:  # a sample the head cannot certify alone, in a batch that cannot be certified whole
            ok, reason = False, (f"FC head: {hr.reason}; with fewer candidates than the batch holds it cannot be "
                                 "certified as part of the whole batch either, so its conv layers were solved "
                                 "without proofs; rebuilt analytically (uncertified)")
        elif ch.bound > opts.max_error * opts.range_width(walk.inputs):
            ok, reason = False, (f"conv layers solved uniquely, but the proven error bound {ch.bound:.1e} of the "
                                 f"rebuilt input exceeds max_error ({opts.max_error:g} of the data range)")
        elif not walk.forward_ok[k]:
            ok, reason = False, "the rebuilt input does not reproduce the recovered features"
        elif not hr.certified:
            ok, reason = False, f"FC head: {hr.reason}"
        else:
            ok, reason = True, (f"FC head witnesses match the rebuilt input's gradient; conv layers solved uniquely; "
                                f"every value within the proven error bound {ch.bound:.1e}")
        records.append(SampleRecovery(label=c.label, certified=ok, reason=reason, witnesses=hr.witnesses,
                                      solved_layers=conv_solved, residual=ch.bound, scale=hr.scale,
                                      error_bound=ch.bound))
    return records


def whole_batch(model: nn.Module, net: Network, complete: list[Candidate], walk: ConvWalk,
                records: list[SampleRecovery], grads: dict[str, torch.Tensor], batch_size: int | None,
                opts: ExclusivityOptions, notes: list[str]) -> bool:
    """When every sample of the batch was rebuilt with a proof, the rebuilt batch's whole gradient (every
    parameter) must reproduce the observed one; then every sample is certified (``records`` updated)."""
    exact = [k for k, ch in enumerate(walk.chains) if walk.solved[k] and ch.unique
             and ch.bound <= opts.max_error * opts.range_width(walk.inputs) and walk.forward_ok[k]]
    if not complete or batch_size is None or not len(exact) == batch_size == len(complete):
        return False
    dev = next(model.parameters()).device
    y = torch.tensor([c.label for c in complete], dtype=torch.long, device=dev)
    pred = batch_gradient(model, net, walk.inputs.to(dev), y, opts.smoothing, opts.class_weights, opts.focal_gamma)
    known = opts.common_scale(batch_size) if opts.known_scale and not opts.weighted_mean else None
    worst, _ = gradient_residual(pred, {k: g.to(dev) for k, g in grads.items()}, known)
    if worst > opts.batch_tol:
        notes.append(f"the rebuilt batch leaves a relative gradient residual of {worst:.2e}")
        return False
    for k in exact:
        if not records[k].certified:
            records[k] = replace(records[k], certified=True, reason="the rebuilt batch reproduces the whole observed "
                                 "gradient (conv layers solved uniquely; proven error bound "
                                 f"{walk.chains[k].bound:.1e})")
    return True
