"""Peeling: the samples a batch's certified samples leave exclusive, certified on the update they leave.

A certified sample is a sample of the batch, held once, at the batch's scale ``s = 1/M`` (a mean loss; 1 for a
summed one). Its whole gradient term, recomputed by real autograd in float64 at its rebuilt input and label,
subtracted from the observed update leaves the update of the other ``M - |C|`` samples at the same scale: where
a neuron fires for certified samples and for one other sample, the update's row mixes them, and the residual's
row is that one sample's alone. Exclusivity is then counted among the samples left, not the whole batch, and
the attack runs again on the residual, read as the update of a batch of the ``M - |C|`` samples it holds (times
``s(M - |C|) / s(M)``), with every check of the certificate. Each round certifies more samples or stops; a round's
certificates stand on the earlier ones (a certificate proves its sample, so the residual is the other samples'
update).

The residual's noise per entry is its rescaled share of the update's own (:mod:`fedleak.attacks.exact.noise`), plus
4 epsilons of the update's dtype on the subtracted terms (the client's sum rounded them with the rest) and half an
epsilon for the residual's own rounding, read where it is used (:mod:`~fedleak.attacks.exact.residual_noise`: a
tensor of it would be as large as the update); a row within its noise of zero is set to zero (the certified
samples' alone). The terms are real autograd in float64 at the certified inputs as the attack returns them, in the
model's dtype (an exact rebuild of a float32 input rounds back to it), with the loss vectors the client computed, in its
dtype (a confident sample's ``softmax - onehot`` cancels: a float64 one left that in the residual, and a sample
certified in the next round came out a blend, 1.6e-4 of the range off), on at least ``LOSS_ROWS`` rows (the inputs
repeated): a float32 product of a few rows takes another path in the BLAS and rounds otherwise than the client's batch
(784-input MLPs of 256 to 4,096 units on Fashion-MNIST, batches of 16 to 1,024, torch's MKL on an AMD EPYC: the logits
of 1 to 3 samples taken alone differed from the client's, of 4 or more matched them; with each round's new samples
taken alone, two of 81 batches of 4 to 48 samples lost a certified sample each). A round takes the
terms of the samples it certified new only and adds them to the earlier rounds' (:class:`PeeledTerms`).

Every round's inputs must be known to ``exact_tol / ROUND_MARGIN``. The residual's noise is the subtracted terms'
rounding on the rows they share, far above a gradient's own: a row two samples left share, one with a ten-thousandth
of the other's share (a confident sample), passes for the larger's alone within that noise, and the input read off
it is a blend of the two; and a peeled input (or one read off a weight change, known to its rounding only) carries
errors the noise model does not follow, which compound over the rounds; a witness row holding such an error is
caught by its disagreement with the others (:func:`~fedleak.attacks.exact.witnesses.input_uncertainty`), a blend
whose rows agree is not. Without the margin in the first round of a gradient, a trained Fashion-MNIST MLP
(784-1024-10, 1,000 SGD steps) certified such a blend 1.8e-4 of the range off its nearest sample (1 in 8,883
certified samples of 1,000 batches of 2 to 64); without it in later rounds, peeled inputs drifted to 5.8e-5 of the
range on trained Fashion-MNIST MLPs and 7.4e-5 on one-step changes at a known rate (with a wider noise model, ``2
sqrt(M)`` epsilons, one went to 1.07e-4).

A term is taken at the batch's scale; without a bias in the first layer, where an input is rebuilt up to a common
factor, at the scale its certificate fitted, which absorbs that factor.

It applies where the batch's scale is pinned (its size reported, the scale known: a gradient, or a one-step weight
change at the learning rate the server set), no declared defense scales the update (label smoothing, which the
certificate recomputes, does not), the loss has no class weights, no per-sample clipping is read and the model's
Dropout ran in eval mode, on MLPs: a CNN's certificate bounds its inputs' error (``max_error``) rather than proving
them exact, and a term taken at an input off by that bound would leave more than rounding in the residual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.attacks.exact.batch_gradient import BatchGradient, batch_gradient
from fedleak.attacks.exact.noise import RoundingNoise, gradient_noise
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.residual_noise import ResidualNoise, held_terms
from fedleak.nets import Network
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import GradientUpdate

F64 = torch.float64
ROUND_MARGIN = 10.0  # every peeling round holds its inputs to this fraction of ``exact_tol`` (module docstring)
# the loss vectors of a round's new samples are taken on at least this many rows (the batch's size where smaller), the
# inputs repeated: a float32 product of a few rows takes another path in the BLAS and rounds otherwise than the client's
# batch (module docstring)
LOSS_ROWS = 32
Rerun = Callable[[GradientUpdate, dict[str, RoundingNoise], ExclusivityOptions], Reconstruction]


def peels(net: Network, update: GradientUpdate, rec: Reconstruction, opts: ExclusivityOptions, scaled: bool) -> bool:
    """Whether the certified samples of ``rec`` can be peeled off ``update`` (module docstring); ``scaled``: the
    declared defenses' reading scales the update (per-layer clipping)."""
    m = update.num_examples
    return (opts.peel and not net.blocks and m is not None and opts.known_scale and not scaled
            and opts.class_weights is None and opts.clip_norm is None and not opts.train_dropout
            and 0 < rec.num_certified < m and not rec.batch_certified and len(rec.samples) == len(rec))


@dataclass(frozen=True)
class PeeledTerms:
    """The terms of the first ``count`` samples peeled so far (their summed gradient, float64): a round computes
    only its new samples' and adds them."""

    count: int
    gradient: BatchGradient


def residual_update(model: nn.Module, net: Network, update: GradientUpdate, inputs: torch.Tensor,
                    labels: torch.Tensor, scales: torch.Tensor, opts: ExclusivityOptions,
                    noise: dict[str, RoundingNoise] | None, before: PeeledTerms | None = None
                    ) -> tuple[GradientUpdate, dict[str, RoundingNoise], PeeledTerms]:
    """The update of the batch's samples other than ``(inputs, labels)`` (each held once, its term taken at its
    ``scales`` entry, :func:`own_scale`), read as the update of a batch of just those samples, its noise per
    entry (module docstring), and the terms taken; ``before``: the terms of the first samples, taken already."""
    m = int(update.num_examples)
    left = m - len(labels)
    rescale = opts.common_scale(left) / opts.common_scale(m)
    dev = next(model.parameters()).device

    def taken(start: int) -> BatchGradient:
        """The terms of the samples from ``start`` on."""
        return batch_gradient(model, net, inputs[start:].to(dev), labels[start:].to(dev), opts.smoothing,
                              focal_gamma=opts.focal_gamma, sample_weights=scales[start:].to(dev), as_sent=True,
                              client_rows=min(m, LOSS_ROWS))

    try:
        terms = taken(0) if before is None else before.gradient.plus(taken(before.count))
    except ValueError:  # a model whose weights streamed otherwise for these samples: every sample's terms again
        terms = taken(0)
    weights = {layer.weight_name for layer in net.head.dense}
    # the residual in the update's dtype (a piece at a time in float64, never whole) and its noise (ResidualNoise)
    grads, noises = {}, {}
    norms: dict[str, list[torch.Tensor]] = {name: [] for name in weights}  # per weight: its rows' and their noise's
    for name, g in update.gradients.items():
        own = noise[name] if noise is not None else gradient_noise(g, 0.0)
        grads[name] = torch.empty_like(g)
        # a streamed weight's terms are read for just the entries asked (their signals and inputs are small)
        noises[name] = ResidualNoise(grads[name], own, terms.products(name) if name in terms.sinks else
                                     held_terms(terms.grads[name]), rescale)
        for rows, p in terms.row_pieces(name, g.shape):  # each piece written in place: no whole temporaries
            taken = p.to(g.device)
            grads[name][rows].copy_(g[rows].to(F64, copy=True).sub_(taken).mul_(rescale))
            if name in weights:  # the rows' norms and their noise's, while the piece is at hand
                norms[name].append(torch.stack([torch.linalg.vector_norm(grads[name][rows], dim=1, dtype=F64),
                                                torch.linalg.vector_norm(noises[name].read(rows, taken), dim=1)]))
    for layer in net.head.dense:  # a row within its noise of zero holds no sample left: the certified ones' alone
        w, b = layer.weight_name, layer.bias_name
        norm, rows_noise = torch.cat(norms[w], 1)
        bound = rows_noise
        if b is not None:
            norm, bound = torch.hypot(norm, grads[b].to(F64)), torch.hypot(bound, noises[b][...])
        silent = torch.nonzero(norm <= bound).flatten()
        for name in (w, b) if b is not None else (w,):
            grads[name].index_fill_(0, silent, 0.0)
            noises[name] = noises[name].silenced(silent, rows_noise if name == w else None)
    return (GradientUpdate(grads, num_examples=left), {name: n.noise() for name, n in noises.items()},
            PeeledTerms(len(labels), terms))


def peeled(model: nn.Module, net: Network, update: GradientUpdate, rec: Reconstruction, opts: ExclusivityOptions,
           noise: dict[str, RoundingNoise] | None, rerun: Rerun, scaled: bool = False) -> Reconstruction:
    """``rec`` with the samples peeling certifies (module docstring) added: ``rerun`` runs the attack on a residual
    update with its noise and options (``opts`` as the declared defenses read it, which they then leave out),
    round after round, while a round certifies more samples; ``scaled``: as :func:`peels`."""
    if not peels(net, update, rec, opts, scaled):
        return rec
    start = time.perf_counter()
    m = int(update.num_examples)
    sure = rec.certified.nonzero().flatten()
    inputs, labels, records = rec.inputs[sure], rec.labels[sure], [rec.samples[k] for k in sure.tolist()]
    scale = opts.common_scale(m)
    fitted = net.head.dense[0].bias_name is None  # a bias-free first layer's rebuild holds a common factor
    scales = [own_scale(r, scale, 1.0, fitted) for r in records]  # each certified sample's scale in the update
    # the residual's noise hides blends with confident samples, and peeled inputs' errors compound: every round's
    # inputs must be known ten times closer (module docstring)
    after = replace(opts, peel=False, defense=None, exact_tol=opts.exact_tol / ROUND_MARGIN)
    last, rounds, terms = rec, 0, None
    while len(records) < m:
        residual = bounds = None  # the last round's, freed before the next is built
        residual, bounds, terms = residual_update(model, net, update, inputs, labels,
                                                  torch.tensor(scales, dtype=F64), opts, noise, terms)
        rescale = opts.common_scale(m - len(records)) / scale  # a residual's scale over the update's
        again = rerun(residual, bounds, after)
        last = again
        if not again.num_certified:
            break
        rounds += 1
        new = again.certified.nonzero().flatten()
        inputs, labels = torch.cat([inputs, again.inputs[new]]), torch.cat([labels, again.labels[new]])
        scales += [own_scale(again.samples[k], scale, rescale, fitted) for k in new.tolist()]
        records += [peeled_record(again.samples[k], len(records), rounds) for k in new.tolist()]
    if not rounds:
        return replace(rec, notes=(*rec.notes, f"peeling: the update the {len(records)} certified sample(s) leave "
                                               "certifies no other sample"))
    rest = (~last.certified).nonzero().flatten()
    whole = len(records) == m  # every sample certified: any other candidate is beyond the batch
    if not whole:
        inputs, labels = torch.cat([inputs, last.inputs[rest]]), torch.cat([labels, last.labels[rest]])
        records += [last.samples[k] for k in rest.tolist()]
    certified = torch.tensor([r.certified for r in records], dtype=torch.bool)
    added = len(records) - rec.num_certified - (0 if whole else len(rest))
    note = (f"peeling: {added} more sample(s) certified in {rounds} round(s), each on the update the samples "
            f"certified before it leave (their recomputed gradient subtracted), where a neuron they share with one "
            f"other sample is that sample's alone")
    notes = (*rec.notes, note, *(() if whole else tuple(f"after peeling: {n}" for n in last.notes)))
    return replace(rec, inputs=inputs, labels=labels, certified=certified, samples=tuple(records),
                   batch_certified=whole and last.batch_certified, joint_residual=last.joint_residual,
                   seconds=rec.seconds + time.perf_counter() - start, notes=notes,
                   missing_reason="" if whole else last.missing_reason)


def own_scale(record: SampleRecovery, scale: float, rescale: float, fitted: bool) -> float:
    """A certified sample's scale in the update: the batch's common ``scale`` (a certified sample is held once), or,
    where ``fitted`` (its input rebuilt without a bias, up to the factor its certificate's scale fit absorbs), its
    record's, read on an update ``rescale`` times it."""
    return record.scale / rescale if fitted and math.isfinite(record.scale) else scale


def peeled_record(record: SampleRecovery, before: int, round_: int) -> SampleRecovery:
    """A sample a peeling round certified, its reason saying on what."""
    return replace(record, reason=f"certified in peeling round {round_}, on the update the {before} sample(s) "
                                  f"certified before it leave: {record.reason}")
