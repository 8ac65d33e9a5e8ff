"""The exclusivity attack's one pipeline, for every network :func:`fedleak.nets.as_network` reads.

A network is conv blocks (none for an MLP) followed by a dense ReLU head. The steps:

1. **Head, top layer** (:mod:`~fedleak.attacks.exact.candidates`): candidates from the exclusively activated
   neurons of the head's last ReLU layer, with their labels.
2. **Head, walk-down** (:mod:`~fedleak.attacks.exact.walkdown`): each candidate traced down the head to its
   features, the input of the first Linear layer (for an MLP, the network's input).
3. **Conv blocks** (:mod:`~fedleak.attacks.exact.conv_step`, solved by :mod:`~fedleak.attacks.exact.conv_walkdown`),
   when the network has some: candidates the head certificate rules out (mixtures of samples) are dropped before
   the expensive part, each sample's features are walked down the blocks to the input, and the features are
   replaced by the rebuilt input's own. Where a block is underdetermined the input is rebuilt by feature
   matching, uncertified.
4. **Certificate** (:mod:`~fedleak.attacks.exact.certificate`), on the features. Below conv blocks a sample is
   certified only when, in addition, every block was solved uniquely with a chained error bound of at most
   ``max_error`` of the data range (the certificate states that bound) and the rebuilt input reproduces the
   features; when every sample of the batch is rebuilt and uniquely solved, the whole recomputed gradient
   (every parameter, real autograd) must reproduce the observed one, which also certifies samples with a single
   witness in the head.

Under a client defense (option ``defense``) the certificate models what it can (per-sample clipping with a known
bound, a common unknown scale) and otherwise certifies nothing and says why
(:func:`fedleak.attacks.defense_aware.exact_plan`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from fedleak.attacks.defense_aware import exact_plan
from fedleak.attacks.exact import dropout
from fedleak.attacks.exact.candidates import unique_candidates
from fedleak.attacks.exact.certificate import BLENDS, off_scale_note, strongly_witnessed
from fedleak.attacks.exact.class_weights import class_scale_note
from fedleak.attacks.exact.conv_step import conv_records, drop_mixtures, walk_and_certify, whole_batch
from fedleak.attacks.exact.like_blends import without_unexcluded_blends
from fedleak.attacks.exact.multiplicity import held_once, with_multiplicity
from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.outcome import Found, estimate_label_counts, within_batch
from fedleak.attacks.exact.output_bias import output_bias_cause
from fedleak.attacks.exact.peeling import peeled
from fedleak.attacks.exact.sample_clip import read_sample_clip
from fedleak.attacks.exact.smoothing import SmoothingReading, read_label_smoothing
from fedleak.attacks.exact.state import HeadAttack
from fedleak.attacks.label_sign import without_unsigned_labels
from fedleak.attacks.masked_input import first_reader, input_masking, withheld
from fedleak.errors import FedleakError, ModelError
from fedleak.nets import NO_HIDDEN_RELU, Network
from fedleak.nets.network import check_head_trainable
from fedleak.precision import FLOAT32, Precision
from fedleak.reconstruction import Reconstruction
from fedleak.threads import pinned_threads
from fedleak.updates import GradientUpdate, check_matches_model

F64 = torch.float64
FEW_CLASS_SMOOTHING = ("the client's label smoothing, which with fewer than four classes cannot be read off the update "
                       "(pass label_smoothing)")


def run_exclusivity(model: nn.Module, net: Network, update: GradientUpdate, opts: ExclusivityOptions, *,
                    noise: dict[str, RoundingNoise] | None = None, name: str = "exclusivity",
                    precision: Precision = FLOAT32, positive: bool = False, unsigned: bool = False
                    ) -> Reconstruction:
    """Run the pipeline on ``update`` (the gradient, or a one-step weight delta with ``known_scale=False``) of
    ``model``, read as ``net``, with torch's and the BLAS libraries' threads pinned to ``opts.threads``.
    ``noise``: the update's own rounding noise per entry, where it is known; ``precision``: the format a gradient's
    values carry (:func:`fedleak.precision.update_precision`; float32 for a weight delta, whose rounding ``noise``
    holds). Where nothing is certified and
    ``label_smoothing`` was not given, the label smoothing the update shows
    (:func:`~fedleak.attacks.exact.smoothing.read_label_smoothing`) is tried once; for a model with Dropout, the
    reading of a client that ran it in training mode (:mod:`~fedleak.attacks.exact.dropout`), unless the update's
    values carry a format coarser than float32 (:mod:`fedleak.precision`), which no reading certifies. Read with an
    unknown factor that is not known to be ``positive`` (a weight delta ``before - after`` is) and no declared
    defense, a two-class model's certificates stand only where the update's negative has no reading with the other
    labels (:func:`~fedleak.attacks.label_sign.without_unsigned_labels`; also at a known scale where the update's
    sign was not read, ``unsigned``: a change read from the model's weights), and only where a blend of like samples
    would show at its scale (:mod:`~fedleak.attacks.exact.like_blends`)."""
    # an MLP's attack is tensor arithmetic only: without autograd's bookkeeping (inference mode) its many small
    # operations cost less (docs/benchmarks.md: up to a tenth of the attack, on the smallest MLPs); a CNN's conv
    # walk-down and whole-batch gradient run on autograd, also when the caller is in inference mode. What the
    # attack returns is copied out of inference mode, so that it can take part in autograd
    with pinned_threads(opts.threads), torch.inference_mode(not net.blocks):
        rec, off_scale, smoothing = run_pinned(model, net, update, opts, noise, name, precision)
        if smoothing is not None:  # the output layer's columns tell a label-smoothed cross-entropy: read with it
            smoothed = replace(opts, label_smoothing=smoothing.value)
            again, again_off, _ = run_pinned(model, net, update, smoothed, noise, name, precision)
            if again.num_certified:
                rec, off_scale, opts = replace(again, notes=(*again.notes, smoothing.note())), again_off, smoothed
            else:
                rec = replace(rec, notes=(*rec.notes, smoothing.note(certified=False)))
        # the reading the result is of: as the client's declared defenses read it (run_pinned applies their plan: a
        # clipped update's factor is unknown, whatever the options said), so that the checks below hold it to that
        plan = exact_plan(opts.defense, update.gradients, net)
        reading = plan.apply
        used = reading(opts)
        if off_scale:  # the samples share another common scale (a clipped, accumulated or summed gradient)
            # the label smoothing as the first reading left it (given, read, or 0): it is not read a second time
            scaled = replace(opts, known_scale=False, label_smoothing=opts.smoothing)
            again, _, _ = run_pinned(model, net, update, scaled, noise, name, precision)
            if again.num_certified:
                used = reading(scaled)
                rec = replace(again, notes=(*again.notes, f"read as a gradient times an unknown common factor "
                                            f"(known_scale=False; a clipped, accumulated or summed gradient, or a "
                                            f"batch that holds each sample the same number of times), as the "
                                            f"samples' scales tell: {off_scale}"))
        weighted = class_scale_note(rec.samples, opts)
        if weighted:  # the samples' scales tell a class-weighted loss, which the options did not give
            samples = tuple(replace(r, reason=f"{r.reason}; or a class-weighted loss (pass class_weights)")
                            if strongly_witnessed(r, opts) else r for r in rec.samples)
            rec = replace(rec, samples=samples, notes=(*rec.notes, weighted))
        # the client may have run the model's Dropout in training mode (not told by a rounded update, of which no
        # reading certifies anything)
        if dropout.worth_rereading(net, opts, rec) and not precision.coarse:
            again, _, _ = run_pinned(model, net, update, replace(opts, train_dropout=True), noise, name,
                                     precision)
            if dropout.rebuilt_strongly(again, opts.min_last) > dropout.rebuilt_strongly(rec, opts.min_last):
                rec = replace(again, notes=(*again.notes, dropout.note(again, opts.min_last)))
                used = replace(used, train_dropout=True)
        rec = signed(model, update, rec, used, positive, unsigned)
    rec = settled(model, net, update, rec, used)

    def on_residual(residual: GradientUpdate, bounds: dict[str, RoundingNoise], again: ExclusivityOptions
                    ) -> Reconstruction:  # read as the first reading settled it: its scale pinned, no re-reading
        with pinned_threads(again.threads), torch.inference_mode(not net.blocks):
            found, off, _ = run_pinned(model, net, residual, again, bounds, name, precision)
            found = signed(model, residual, replace(found, notes=tuple(n for n in found.notes if n != off)), again,
                           positive, unsigned)
        return settled(model, net, residual, found, again)

    return peeled(model, net, update, rec, used, noise, on_residual, scaled=bool(plan.factors))


def signed(model: nn.Module, update: GradientUpdate, rec: Reconstruction, used: ExclusivityOptions, positive: bool,
           unsigned: bool) -> Reconstruction:
    """``rec``, its certificates held to the update's sign where it was not read (:func:`run_exclusivity`)."""
    if positive or used.defense or (used.known_scale and not unsigned):
        return rec
    batch = update.num_examples or rec.batch_size  # an unsigned change at a known rate: its scale's size
    return without_unsigned_labels(model, rec, batch, used.smoothing, used.class_weights, focal_gamma=used.focal_gamma,
                                   magnitude=1.0 / batch if used.known_scale and batch else None)


def settled(model: nn.Module, net: Network, update: GradientUpdate, rec: Reconstruction, used: ExclusivityOptions
            ) -> Reconstruction:
    """``rec`` (copied out of inference mode) with its repeated inputs read, its certificates held to where a blend
    of like samples would show and to a per-sample clipping the client did not declare."""
    rec = replace(rec, inputs=rec.inputs.clone(), labels=rec.labels.clone(), certified=rec.certified.clone())
    # how many times the batch holds the inputs not certified (the whole gradient on autograd: out of inference mode)
    rec = with_multiplicity(model, net, update.gradients, rec, used, update.num_examples or rec.batch_size)
    # read at the scale the certified samples share; their certificates then stand only where a blend would show
    rec = without_unexcluded_blends(model, rec, net.num_classes, update.num_examples, used.known_scale,
                                    used.range_width(rec.inputs) if len(rec) else 1.0)
    return read_sample_clip(net, rec, used, update.num_examples or rec.batch_size)  # per-sample clipping undeclared


def run_pinned(model: nn.Module, net: Network, update: GradientUpdate, opts: ExclusivityOptions,
               noise: dict[str, RoundingNoise] | None, name: str, precision: Precision = FLOAT32
               ) -> tuple[Reconstruction, str, SmoothingReading | None]:
    """:func:`run_exclusivity`, with the thread count already set; and, when nothing is certified and the
    strongly witnessed samples share a scale other than the reported batch's, the note saying so
    (:func:`~fedleak.attacks.exact.certificate.off_scale_note`), else empty; and, where ``label_smoothing`` is
    None and nothing was certified as the gradient of a plain cross-entropy, the label smoothing read off the update
    (:func:`~fedleak.attacks.exact.smoothing.read_label_smoothing`; None where none is)."""
    start = time.perf_counter()
    readable = (opts.label_smoothing is None and opts.class_weights is None and not opts.focal_gamma
                and not opts.train_dropout)
    plan = exact_plan(opts.defense, update.gradients, net)  # what the certificate can do under the client's defenses
    opts, noise = plan.apply(opts), plan.rescale(noise)  # a defense's factors scale the noise as it is read
    if plan.factors:  # a modelled defense scales the update (validated once already, so only when it changes)
        update = replace(update, gradients=plan.rescale(update.gradients))
    head = net.head
    if head.depth == 0:
        raise ModelError(NO_HIDDEN_RELU)
    if opts.class_weights is not None and len(opts.class_weights) != head.num_classes:
        raise FedleakError(f"class_weights has {len(opts.class_weights)} entries, but the model has "
                           f"{head.num_classes} output(s): give one weight per class of a cross-entropy")
    if opts.train_dropout and net.blocks:
        raise FedleakError("train_dropout is supported for MLPs only: a CNN's conv inversion and whole-batch "
                           "certificate recompute the samples' gradients, which the unknown dropped units change")
    if opts.clip_norm is not None and net.blocks:
        raise FedleakError("clip_norm is supported for MLPs only: a CNN sample's gradient norm includes its conv "
                           "layers, which the head's certificate does not recompute")
    check_head_trainable(model, net)
    check_matches_model(model, update.gradients, "gradient")
    grads = dict(update.gradients)
    obs_dtype = next(iter(grads.values())).dtype
    reported = update.num_examples
    attack = HeadAttack(head, grads, opts, obs_dtype, noise, precision)
    notes = attack.notes
    read_as, read_caveats = dropout.as_read(net, opts)
    notes.extend(read_as)  # what was assumed to read the model (an inferred input shape)

    # 1-2. the head, on the features
    cands = unique_candidates(attack.top_candidates(), head.depth - 1, attack.tol(opts.group_tol))
    attack.walk_down(cands, reported)
    complete = [c for c in cands if c.complete]
    if len(cands) > len(complete):
        notes.append(f"{len(cands) - len(complete)} candidate(s) read at the last ReLU layer could not be traced "
                     "down to the input of the first Linear layer (a candidate is a sample, or a mixture of samples "
                     "that share its neurons, which no input below reproduces)")
    found = Found(len(cands), len(complete))
    # 3. the conv blocks, top down, and 4. the certificate, on the (rebuilt) features
    walk = None
    if net.blocks:
        complete, batch = drop_mixtures(attack, complete, reported)
        found = replace(found, mixtures=found.traced - len(complete))
        walk, cert = walk_and_certify(attack, net, complete, batch, reported, obs_dtype)
    else:
        cert = attack.certify(complete, reported)
    records, batch_ok = list(cert.recoveries), cert.batch_certified
    if walk is None:
        inputs = (torch.stack([c.acts[0] for c in complete]) if complete
                  else torch.empty(0, head.input_dim, dtype=F64)).reshape(len(complete), *net.input_shape)
    else:
        inputs = walk.inputs
        records = conv_records(net, complete, walk, cert.recoveries, opts)
        batch_ok = whole_batch(model, net, complete, walk, records, grads, cert.batch_size, opts, notes)
    rebuilt = [walk is None or walk.solved[k] or opts.fallback == "features" for k in range(len(complete))]
    records = [replace(r, route=dropout.route(name, r.certified, opts), rebuilt=ok) for r, ok in zip(records, rebuilt)]
    if opts.train_dropout:  # every record was settled uncertified: its reason names the model's Dropout layers
        records = [replace(r, reason=dropout.reason(net.dropout)) for r in records]
    # a certificate proves the input the model's first layer read, which the model may change in training mode
    masked = withheld(input_masking(model, first_reader(net), net.input_shape), opts.train_dropout) if any(
        r.certified for r in records) else ""
    if masked:
        records = [replace(r, certified=False, reason=masked, route=dropout.route(name, False, opts))
                   if r.certified else r for r in records]
        batch_ok = False
        notes.append(f"certificates withheld: {masked}")
    keep = list(range(len(records)))
    if not opts.beyond_batch:  # each record's own factor: its label's class weight
        own = opts.class_factors(torch.tensor([r.label for r in records], dtype=torch.long))
        keep = within_batch(records, cert.batch_size, cert.factor, own)
    if len(keep) < len(records):
        notes.append(f"{len(records) - len(keep)} uncertified candidate(s) beyond the batch of {cert.batch_size} were "
                     "dropped (the least plausible: blends of samples, fewest witnesses)")
    if batch_ok and len(keep) > sum(records[k].certified for k in keep):  # the rest are proven not to be samples
        notes.append(f"{len(keep) - sum(records[k].certified for k in keep)} uncertified candidate(s) were dropped: "
                     "the certified samples are the whole batch, so they are no samples (blends of samples that "
                     "share neurons, or the update's rounding)")
        keep = [k for k in keep if records[k].certified]
    if len(keep) < len(records):
        complete, records, inputs = [complete[k] for k in keep], [records[k] for k in keep], inputs[keep]
    logits = cert.logits[keep] if complete else None  # the certificate's forward pass of the features

    off_scale = (opts.known_scale and opts.class_weights is None and not opts.train_dropout and reported is not None
                 and off_scale_note(cert.recoveries, reported, opts))
    if off_scale:  # the strongly witnessed samples' scales tell that the update is not what the options say
        notes.append(off_scale)
        records = [replace(r, reason=off_scale) if strongly_witnessed(r, opts) else r for r in records]
    if batch_ok:
        notes.append("the certified samples are the whole batch and reproduce the whole observed gradient")
    blends = [r for r in records if not r.certified and "blend" in r.reason and not opts.train_dropout]
    if blends and not off_scale:  # at a wrong common scale, the samples' scales do not tell blends
        notes.append(f"{len(blends)} {BLENDS}")
    missing = found.missing(head, records, cert.batch_size)
    caveats = read_caveats
    # a gradient computed under autocast or sent in float16, or weights sent in float16: its rounding alone exceeds
    # max_noise (the weights' dtype; their values carry a weight delta's own rounding, which the noise bounds)
    sent = max([precision, *(Precision(n.values.dtype, stored=n.values.dtype) for n in (noise or {}).values())],
               key=lambda p: p.roundoff)
    if sent.roundoff > opts.max_noise:
        caveats += (f"{sent.describe()}, whose rounding ({sent.roundoff:.1e} relative) alone exceeds "
                    f"max_noise={opts.max_noise:g}: an update in this precision is not certified",)
    if readable and head.num_classes < 4:  # (:mod:`fedleak.attacks.exact.smoothing`)
        caveats += (FEW_CLASS_SMOOTHING,)
    if caveats and not any(r.certified for r in records):  # how the model or the update was read may be the cause
        cause = "; or ".join(caveats)
        missing = f"{missing}; or {cause}" if missing else ""
        records = [replace(r, reason=f"{r.reason}; or {cause}" if r.reason else cause) for r in records]
    cause = output_bias_cause(net, grads, opts, noise, reported, bool(records), precision) if missing or records else ""
    if cause and not any(r.certified for r in records):  # what the output bias says about the loss read
        missing = f"{cause}; and {missing}" if missing else ""
        records = [replace(r, reason=f"{cause}; and {r.reason}" if r.reason else cause) for r in records]
    if net.uncertifiable:  # first, what no batch size or perturbation can change
        missing = f"{net.uncertifiable}; and {missing}" if missing else ""
        records = [replace(r, reason=f"{net.uncertifiable}; and {r.reason}" if r.reason else net.uncertifiable)
                   for r in records]
    if logits is not None and cert.batch_size is not None:  # inputs held at the batch's scale (auto holds them)
        records = held_once(records, logits, cert.batch_size, opts, noise is None and not precision.coarse
                            and not net.blocks)
    y = torch.tensor([c.label for c in complete], dtype=torch.long)
    certified = torch.tensor([r.certified for r in records], dtype=torch.bool)
    counts = None
    # with class weights (or a focal loss) the bias gradient weighs each label (each sample); with dropout in training
    # mode the logits are unknown
    if opts.known_scale and opts.class_weights is None and not opts.focal_gamma and not opts.train_dropout:
        probs = torch.empty(0, head.num_classes, dtype=F64)
        if complete:
            probs = torch.softmax(logits, 1).cpu()
        counts = estimate_label_counts(head.num_classes, attack.g[-1], cert.batch_size, cert.factor, probs[certified],
                                       y[certified], opts.smoothing)
    rec = plan.finish(Reconstruction(
        inputs=inputs.cpu().to(head.dense[0].weight.dtype),
        labels=y,
        certified=certified,
        attack=name,
        samples=tuple(records),
        batch_size=cert.batch_size,
        label_counts=counts,
        batch_certified=batch_ok,
        joint_residual=cert.joint_residual,
        seconds=time.perf_counter() - start,
        notes=tuple(notes),
        missing_reason=missing,
    ))
    smoothing = read_label_smoothing(attack) if readable and not rec.num_certified else None
    return rec, off_scale or "", smoothing
