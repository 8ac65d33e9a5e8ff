"""The certificate of the exclusivity attack: per-sample witnesses, then a joint test of the certified set.

A certified sample must be one of the batch's inputs, with its label. Two checks make that argument
(docs/attacks.md, "The certificate", has the proof and its assumptions):

1. **Witnesses** (per sample). The rebuilt input's gradient is recomputed in float64; on every row it claims
   as its own (its *witnesses*) the observed gradient must equal ``s_k`` times it, within that row's float32
   noise; ``s_k`` is the sample's scale (``1/M`` for a mean-loss gradient of ``M`` samples, times
   ``min(1, C/||g_k||)`` under per-sample clipping to norm ``C``). This proves that the witness rows are
   explained by the rebuilt input, but not that they are *exclusive*: with two classes every loss vector is a
   multiple of ``(1, -1)``, so a neuron shared by a set of samples yields a self-consistent blend of them
   whose rows agree on everything but their scale.
2. **Joint test** (the whole set). The observed gradient of every layer is a sum of ``M`` per-sample rank-one
   terms ``s_m delta_m [a_m, 1]^T``. If every certified sample is a true sample, the residual after
   subtracting their terms is the sum of the other ``M - |C|`` samples' terms, so its rank is at most
   ``M - |C|``. A blend is a combination of true samples' inputs whose backward signal is not theirs:
   subtracting it leaves one more independent direction, and the residual's rank exceeds ``M - |C|``.
   The test measures the residual's energy beyond rank ``M - |C|`` (on a Gaussian sketch of the layer, or
   exactly) and the certified set is the largest set of witnessed samples that passes it, together with three more:
   no term on rows that are exactly zero, no term on another certified sample's witness rows, and, for loss
   vectors other samples can share, an input outside the span of the uncertified samples' inputs
   (:mod:`fedleak.attacks.exact.joint`, :mod:`fedleak.attacks.exact.rank_test`). Step 1 lives in
   :mod:`fedleak.attacks.exact.witnesses`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedleak.attacks.exact.ambiguity import AT_SCALE, ambiguous
from fedleak.attacks.exact.batch_scale import BatchScale, batch_scale
from fedleak.attacks.exact.dropout import settle_all
from fedleak.attacks.exact.joint import (
    IndependenceTest,
    WitnessConflicts,
    dead_row_contributions,
    degenerate_loss_vectors,
    select_consistent,
)
from fedleak.attacks.exact.near_rows import Screens
from fedleak.attacks.exact.options import REDUCTIONS
from fedleak.attacks.exact.rank_test import JointTest
from fedleak.attacks.exact.settle import settled_by_scale
from fedleak.attacks.exact.traces import CandidateTraces, join
from fedleak.attacks.exact.witnesses import (
    LabelSignals,
    WitnessFit,
    fit_witnesses,
    input_uncertainty,
    label_signals,
    per_sample_norms,
)
from fedleak.nets import Trace
from fedleak.reconstruction import SampleRecovery

F64 = torch.float64

#: the note on the candidates the certificate ruled out as blends (after their count)
BLENDS = ("rebuilt candidate(s) are ruled out by their scale or the joint test: blends of samples, or samples of a loss "
          "that weighs each one by a factor of its own (a focal loss, whose factor follows the sample's "
          "confidence: pass focal_gamma); "
          "they are returned uncertified")


# -------------------------------------------------------------------------------------------------------
# The certificate


@dataclass(frozen=True)
class Certificate:
    """What :func:`certify` concludes: a record per complete candidate (in order), the batch size and the
    common scale factor it found, whether the certified samples are the whole batch and explain it, and the
    joint test's residual for the certified set (relative to the layer's gradient, worst layer), and the
    complete candidates' logits (float64, one row per record; None without candidates)."""

    recoveries: tuple[SampleRecovery, ...]
    batch_size: int | None
    factor: float | None
    batch_certified: bool
    joint_residual: float = float("nan")
    logits: torch.Tensor | None = None


def certify(attack, cands: list, reported: int | None) -> Certificate:
    """Certify the complete candidates: those the top layer's check already rules out are settled first
    (:func:`fedleak.attacks.exact.settle.settled_by_scale`; with ``train_dropout`` all of them), the others get the
    certificate (:func:`certify_open`)."""
    complete = [c for c in cands if c.complete]
    # read as a client in training mode, nothing can be certified (:mod:`fedleak.attacks.exact.dropout`)
    settled = settle_all(complete) if attack.opts.train_dropout else settled_by_scale(attack, complete, reported)
    if not settled:
        return certify_open(attack, complete, reported)
    open_ = [k for k in range(len(complete)) if k not in settled]
    cert = certify_open(attack, [complete[k] for k in open_], reported)
    recs: list[SampleRecovery | None] = [None] * len(complete)
    logits = torch.empty(len(complete), attack.net.num_classes, dtype=F64, device=complete[0].acts[0].device)
    for j, k in enumerate(open_):
        recs[k], logits[k] = cert.recoveries[j], cert.logits[j]
    depth = attack.net.depth
    for k, why in settled.items():
        c = complete[k]
        c.first = None  # its pre-activations (one float64 row of the layer's width) are read no more
        counts = tuple(min(len(c.witnesses.get(i, ())), attack.opts.max_witnesses) for i in range(depth))
        recs[k] = SampleRecovery(label=c.label, certified=False, reason=why, witnesses=counts,
                                 solved_layers=tuple(sorted(i + 1 for i in c.solved)), scale=c.scale)
        logits[k] = c.logits
    return replace(cert, recoveries=tuple(recs), logits=logits)


def certify_open(attack, complete: list, reported: int | None) -> Certificate:
    """Certify the complete candidates: per-sample witnesses, the batch scale, then the joint test."""
    net, opts = attack.net, attack.opts
    if not complete:
        return Certificate((), reported, None, False)
    X = torch.stack([c.acts[0] for c in complete])
    y = torch.tensor([c.label for c in complete], device=X.device)
    traces = CandidateTraces(attack, complete, X, y)
    has_bias = [gb is not None for gb in attack.g]

    kept: list[LabelSignals] = []  # the label entry's signals, kept with the trace where there is one block

    def read(block: range, t: Trace) -> tuple[list[WitnessFit], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A block's witness fits, logits, terms on rows no sample opens and (under clipping) gradient norms."""
        label = LabelSignals(attack, t, y[block.start : block.stop])
        if t is traces.kept:
            kept.append(label)
        fits = fit_witnesses(attack, complete[block.start : block.stop], t, label)
        norms = per_sample_norms(t, has_bias) if opts.clip_norm is not None else None
        return fits, t.logits, dead_row_contributions(attack, t), norms

    fits_of, logits_of, dead_of, norms_of = zip(*traces.read(read))
    fits: list[WitnessFit] = [f for part in fits_of for f in part]
    logits = torch.cat(logits_of)
    if opts.clip_norm is not None:
        clip = (opts.clip_norm / torch.cat(norms_of)).clamp(max=1.0).cpu().numpy()
    else:
        clip = np.ones(len(complete))
    own = clip * opts.class_factors(y)  # each sample's own factor: its clipping and its label's class weight
    n_layers = net.depth

    def witnessed(f: WitnessFit, c) -> str | None:
        """Why the sample's own witnesses fall short (None when they suffice)."""
        if not f.consistent:
            return "the rebuilt input does not reproduce its own intermediate activations"
        if f.counts[-1] < opts.min_last:
            why = (f"only {f.counts[-1]} verified exclusive neuron(s) at the last ReLU layer (a certificate "
                   f"needs {opts.min_last})")
            if f.noisy_rows:
                why += (f"; {f.noisy_rows} witness row(s) are noisier than max_noise={opts.max_noise:g} relative "
                        f"(the update's {str(attack.rounding_dtype).removeprefix('torch.')} rounding)")
            return why
        missing = [i + 1 for i in range(n_layers - 1) if f.counts[i] < opts.min_other and i not in c.solved]
        if missing:
            return f"no verified exclusive neuron at ReLU layer(s) {missing}"
        if not (f.scale > 0 and math.isfinite(f.scale)):
            return "its witness rows do not fit one positive scale"
        return None

    # the test of rival rows screens the first layer for each input it reads: the inputs it reads next, in order, are
    # screened a block at a time (:class:`~fedleak.attacks.exact.near_rows.Screens`)
    rows = attack.near_rows()
    planned: dict[int, tuple[Screens, int]] = {}

    def plan(ks: list[int]) -> None:
        """The test reads candidates ``ks`` next, in this order."""
        if rows is not None and ks:
            screens = Screens(rows, X[ks])
            planned.update({k: (screens, j) for j, k in enumerate(ks)})

    def imprecise(f: WitnessFit, c, k: int) -> str | None:
        """Why the rebuilt input of candidate ``k`` is not known to the exactness tolerance (None when it is);
        applies to every path to a certificate, the whole-batch one included."""
        x = c.acts[0]
        width = opts.range_width(x)
        allowed = opts.exact_tol * width
        spread = input_uncertainty(attack, f, x)
        if spread > allowed:
            return (f"the update's rounding leaves the rebuilt input uncertain by up to {spread:.1e}, more than "
                    f"{opts.exact_tol:g} of the data range ({allowed:.1e}): too few or too weak witness rows for "
                    "that rounding (a weight change's at its learning rate, or the terms peeling subtracted), or "
                    "witness rows that disagree beyond it (one holding another sample's share)")
        screen = planned[k][0].of(planned[k][1]) if k in planned else None
        shared = 0.0 if rows is None else rows.rival(x, width, allowed - spread, screen)
        if shared:
            return (f"first-layer rows that read almost this input disagree with it by up to {shared:.1e} beyond the "
                    f"update's rounding, which leaves it uncertain by more than {opts.exact_tol:g} of the data range "
                    f"({allowed:.1e}): a sample of near-zero loss shares some of its rows")
        return None

    # how precisely the input is known is asked only of the candidates whose witnesses suffice (on two-class data
    # most of the hundreds of blends have one witness row) and of those that could join as part of the whole batch
    vague = functools.cache(lambda k: imprecise(fits[k], complete[k], k))
    unwitnessed = [witnessed(f, c) for f, c in zip(fits, complete)]
    plan([k for k, why in enumerate(unwitnessed) if why is None])
    short = [why or vague(k) for k, why in enumerate(unwitnessed)]
    strong = [k for k, why in enumerate(short) if why is None]
    voters = [k for k, f in enumerate(fits) if f.consistent and f.counts[-1] >= 1 and math.isfinite(f.scale)]
    bs = batch_scale(fits, strong, own, reported, opts, voters)
    reasons: list[str | None] = list(short)
    certified: set[int] = set()
    batch_ok = False
    joint = float("nan")
    if bs.factor is None:
        for k in strong:
            reasons[k] = bs.reason
    else:
        expected = bs.factor * own
        off = np.array([abs(f.scale / e - 1) if e > 0 else np.inf for f, e in zip(fits, expected)])
        at_scale = [k for k in strong if off[k] <= fits[k].scale_tol]
        for k in strong:
            if k not in at_scale:
                reasons[k] = ("scale differs from the batch's common scale: a blend of samples, or a sample the "
                              "client weighed apart from the rest (micro-batches of unequal sizes accumulated)")
        weights = torch.from_numpy(expected).to(device=X.device, dtype=F64)
        dead = weights.abs() * torch.cat(dead_of)
        for k in list(at_scale):
            if float(dead[k]) > opts.check_tol:
                at_scale.remove(k)
                reasons[k] = ("it would add to gradient rows that are exactly zero, where no sample of the batch is "
                              "active (a blend of samples, not a sample)")
        # samples with a single witness at the common scale join only as part of the whole batch
        single = [k for k, f in enumerate(fits) if k not in at_scale and f.consistent and f.counts[-1] >= 1
                  and off[k] <= f.scale_tol and float(dead[k]) <= opts.check_tol]
        plan([k for k in single if unwitnessed[k] is not None])  # the others' are read already
        weak = [k for k in single if vague(k) is None]
        slack = max(bs.batch_size - len(at_scale), 0) + 16
        eps = torch.tensor([f.eps if math.isfinite(f.eps) else 0.0 for f in fits], dtype=F64, device=X.device)
        # the samples a certified set can hold (hundreds of candidates on two-class data are blends at other
        # scales): the conflicts are taken where one of them is involved, the joint tests see them alone
        among = sorted(at_scale + weak)
        conflicts = WitnessConflicts(attack, [f.passing for f in fits], weights, among=among)

        def gather(block: range, t: Trace) -> Trace:
            """The block's conflicts, and the trace of its candidates among those the joint tests take."""
            conflicts.add(t, block)
            return t.samples(torch.tensor([k - block.start for k in among if k in block], dtype=torch.long,
                                          device=X.device))

        t_sub = join(traces.read(gather))
        local = {k: j for j, k in enumerate(among)}  # their numbers in the joint tests
        sub = torch.tensor(among, dtype=torch.long, device=X.device)
        w_sub = weights[sub]
        signals = kept[0].of(sub) if kept else label_signals(attack, t_sub.activations[1:], y[sub])
        corrections = (eps[sub], *signals)
        test = JointTest(attack, t_sub, bs.batch_size, w_sub, slack, corrections=corrections)
        degenerate = torch.nonzero(degenerate_loss_vectors(t_sub.loss_vectors, t_sub.logits)).flatten().tolist()
        independent = IndependenceTest(attack, t_sub, bs.batch_size, w_sub, opts.min_distance, degenerate,
                                       corrections=corrections)
        if not independent.possible(at_scale):
            for k in [k for k in at_scale if local[k] in independent.tested]:
                at_scale.remove(k)
                reasons[k] = ("cannot be told from a blend of other samples: its loss vector is one other samples "
                              "share, and the samples not rebuilt are too many for their inputs to leave room "
                              "outside their span")

        def excess(members: list[int]) -> float:
            mine = [local[k] for k in members]
            return max(test.excess(mine), conflicts.excess(members), independent.excess(mine))

        whole = sorted(at_scale + weak)
        if len(whole) == bs.batch_size and (weak or bs.whole_batch_only) and excess(whole) <= 1.0:
            certified, batch_ok = set(whole), True
        elif bs.whole_batch_only:
            for k in at_scale:
                reasons[k] = bs.reason
        elif at_scale:
            pressure = conflicts.pressure()
            suspicion = [float(pressure[k]) + min(off[k] / max(fits[k].scale_tol, 1e-300), 1.0)
                         - 1e-3 * sum(fits[k].counts) / (1 + sum(fits[k].counts)) for k in range(len(complete))]
            chosen, within = select_consistent(excess, at_scale, suspicion)
            certified = set(chosen)
            batch_ok = len(certified) == bs.batch_size
            for k in at_scale:
                if k not in certified:
                    reasons[k] = ("left out: with it the rebuilt samples do not jointly explain the observed gradient "
                                  "(a blend of samples, not a sample)" if within else
                                  "the rebuilt samples do not jointly explain the observed gradient, and no subset "
                                  "was found that does")
        if certified and not batch_ok:  # a sample the update cannot tell from a nearby blend to the tolerance
            near = [j for j in range(len(complete)) if off[j] <= AT_SCALE and fits[j].counts[-1] >= 1]
            rows = sorted(certified | set(near))  # only these inputs are stacked (a CNN's features are wide)
            at = {j: i for i, j in enumerate(rows)}
            xs = torch.stack([complete[j].acts[0].reshape(-1) for j in rows])
            spread = [input_uncertainty(attack, fits[j], complete[j].acts[0]) for j in rows]  # a weight delta's
            doubt = ambiguous(xs, [complete[j].label for j in rows], [at[k] for k in sorted(certified)],
                              [at[j] for j in near], opts.exact_tol, opts.range_width(xs[[at[j] for j in near]]),
                              spread)
            doubt = {rows[i]: why for i, why in doubt.items()}
            for k, why in doubt.items():
                certified.discard(k)
                reasons[k] = why
        if certified:
            joint = test.residual(sorted(local[k] for k in certified))
        elif bs.inferred and len(at_scale) > bs.batch_size:  # more samples at 1/M than M, none consistent
            bs = BatchScale(None, None, crowded(len(at_scale), bs.factor))
            for k in at_scale:
                reasons[k] = bs.reason
        if not check_invariants(complete, sorted(certified), bs.batch_size, opts.group_tol):
            attack.notes.append("internal check failed (certified samples not distinct or more than the batch): "
                                "nothing certified")
            certified, batch_ok = set(), False
    recs = []
    for k, (c, f) in enumerate(zip(complete, fits)):
        ok = k in certified
        if ok:
            reason = ("the rebuilt batch reproduces the whole observed gradient" if batch_ok and short[k] is not None
                      else "explains its exclusive gradient rows at every layer, jointly with the other certified "
                      "samples")
        else:
            reason = reasons[k] or "left out of the certified set"
        recs.append(SampleRecovery(label=c.label, certified=ok, reason=reason, witnesses=f.counts,
                                   solved_layers=tuple(sorted(i + 1 for i in c.solved)), residual=f.residual,
                                   scale=f.scale))
    return Certificate(tuple(recs), bs.batch_size, bs.factor, batch_ok, joint, logits)


def crowded(count: int, scale: float) -> str:
    """Why ``count`` samples sharing the scale ``scale`` of a batch smaller than them certify nothing."""
    return (f"{count} rebuilt samples share the scale {scale:.3g}, more than a mean-loss gradient with that scale has "
            "samples, and no set of them explains the gradient: the update is not a mean-loss gradient. For a summed "
            "loss (reduction='sum': every sample at scale 1) pass loss_reduction='sum', for another factor "
            "known_scale=False, and report the batch size (num_examples)")


OFF_SCALE_FIT = 0.01  # a loss reduction whose scale is this close (relative) to the samples' is suggested


def off_scale_note(recoveries, reported: int, opts) -> str:
    """A note when nothing is certified and no strongly witnessed sample sits at the common scale the reported
    batch size implies (the update is not the gradient the options describe), with the scale they share and
    what to pass instead; empty otherwise."""
    strong = [r for r in recoveries if strongly_witnessed(r, opts) and np.isfinite(r.scale) and r.scale > 0]
    common = opts.common_scale(reported)
    if not strong or any(r.certified for r in recoveries) or any(abs(r.scale / common - 1) <= opts.scale_tol
                                                                 for r in strong):
        return ""
    scales = [r.scale for r in strong]
    shared = float(np.median(scales))
    fits = [name for name, red in REDUCTIONS.items() if abs(shared / red.scale(reported) - 1) <= OFF_SCALE_FIT]
    hint = (f"pass loss_reduction='{fits[0]}'" if fits else
            "a gradient times another common factor needs known_scale=False (a focal loss, whose factor follows each "
            "sample's confidence, needs focal_gamma)")
    if not fits and max(scales) > min(scales) * (1 + OFF_SCALE_FIT):
        blends = ("each is a blend of samples that share their neurons, at several times one sample's scale as blends "
                  "sit (fedleak.analyze_exclusivity tells whether any sample has exclusive neurons of its own), or "
                  if min(scales) > common * (1 + OFF_SCALE_FIT) else "")
        hint = (f"they share no common factor either (from {min(scales):.3g} to {max(scales):.3g}): {blends}the client "
                "weighed its samples apart, by their class's weight or with a loss whose gradient is a per-sample "
                "multiple of the cross-entropy's (a focal loss: pass focal_gamma)")
    return (f"no rebuilt sample has the scale {opts.reduction.written(reported)} that {reported} examples give each "
            f"sample of a {opts.loss_reduction}-loss gradient (the strongly witnessed ones have a median scale of "
            f"{shared:.3g}): {hint}")


def strongly_witnessed(record: SampleRecovery, opts) -> bool:
    """Whether an uncertified sample has the witnesses at the last ReLU layer a certificate needs."""
    return not record.certified and bool(record.witnesses) and record.witnesses[-1] >= opts.min_last


def check_invariants(complete: list, certified: list[int], batch_size: int | None, tol: float) -> bool:
    """Certified samples are at most the batch size and pairwise distinct (two copies of one input with one
    label cannot both be certified)."""
    if batch_size is not None and len(certified) > batch_size:
        return False
    for a_i, a in enumerate(certified):
        xa = complete[a].acts[0]
        for b in certified[a_i + 1:]:
            xb = complete[b].acts[0]
            if complete[a].label == complete[b].label and float((xa - xb).norm()) <= 10 * tol * float(xa.norm()):
                return False
    return True
