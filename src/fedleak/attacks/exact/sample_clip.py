"""Per-sample clipping the client did not declare, read off the samples it clipped.

DP-SGD's clipping (Opacus's ``max_grad_norm``; without noise, or with noise too small to hide it) scales each
sample's gradient down to norm ``C`` before the batch's mean: a clipped sample enters the update at
``C / ||g_i|| / M``, below the batch's ``1/M``, and the certificate, which expects ``1/M``, reads it as a blend of
samples. Its own gradient norm ``||g_i||`` follows from its rebuilt input
(:func:`~fedleak.attacks.exact.witnesses.per_sample_norms`), so ``scale * M * ||g_i||`` is ``C`` for every clipped
sample. Where two strongly witnessed samples below the batch's scale, which the model does not classify with near
certainty (a saturated softmax puts blends at one bound too), agree on ``C`` (to :data:`CLIP_TOL`) and no
certified sample's own norm is above it, a note names ``C`` and the option that models it (``clip_norm``: the
certificate then takes every sample at ``min(1, C / ||g_i||) / M``), and those samples' reasons say so. Nothing is
certified here: a blend of samples could agree on a bound by chance, and the reading is the user's to confirm.
(Measured: Fashion-MNIST, a user's MLP of 1024, batches of 8 clipped at their median norm: half the batch
certified, the other half called blends; with ``clip_norm`` given, all 8.)
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedleak.attacks.exact.certificate import strongly_witnessed
from fedleak.attacks.exact.multiplicity import SATURATED
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.witnesses import per_sample_norms
from fedleak.nets import Network
from fedleak.nets.forward import forward_trace
from fedleak.reconstruction import Reconstruction

CLIP_TOL = 3e-5  # clipped samples' bounds agree to this (relative; measured within 6.5e-6 on 30 clipped batches)
MAX_READ = 64  # the strongly witnessed samples below the batch's scale whose bounds are read, at most


def read_sample_clip(net: Network, rec: Reconstruction, opts: ExclusivityOptions,
                     batch_size: int | None) -> Reconstruction:
    """``rec`` with a note and reasons where its samples show per-sample clipping at one bound (module
    docstring); ``batch_size``: reported, or read off the certified samples' common scale."""
    if (rec.batch_certified or batch_size is None or net.blocks or not opts.known_scale or opts.clip_norm is not None
            or opts.class_weights is not None or opts.focal_gamma or opts.train_dropout or opts.defense
            or len(rec.samples) != len(rec)):
        return rec
    unit = opts.common_scale(batch_size)
    below = [k for k, r in enumerate(rec.samples) if not r.certified and r.rebuilt and strongly_witnessed(r, opts)
             and 0 < r.scale / unit < 1 - CLIP_TOL][:MAX_READ]
    if len(below) < 2:
        return rec
    sure = rec.certified.nonzero().flatten().tolist()
    index = torch.tensor(below + sure, dtype=torch.long)
    trace = forward_trace(net.head, rec.inputs[index], rec.labels[index].to(net.device), smoothing=opts.smoothing)
    norms = per_sample_norms(trace, [d.bias_name is not None for d in net.head.dense]).tolist()
    sure_of = torch.softmax(trace.logits[: len(below)], 1).amax(1).tolist()  # a saturated softmax: no reading
    bounds = sorted((rec.samples[k].scale / unit * n, k) for k, n, p in zip(below, norms, sure_of)
                    if p <= 1 - SATURATED)
    if len(bounds) < 2:
        return rec
    agree = max(([b for b in bounds[i:] if b[0] <= bound * (1 + CLIP_TOL)] for i, (bound, _) in enumerate(bounds)),
                key=len)
    clip = agree[len(agree) // 2][0]
    if len(agree) < 2 or any(n > clip * (1 + CLIP_TOL) for n in norms[len(below):]):
        return rec  # one sample alone, or a certified sample's own norm above the bound: not a clip
    said = (f"a sample clipped to gradient norm {clip:.6g} (per-sample clipping, as DP-SGD's max_grad_norm: pass "
            f"clip_norm={clip:.6g})")
    samples = list(rec.samples)
    for _, k in agree:
        samples[k] = replace(samples[k], reason=f"{samples[k].reason}; or {said}")
    note = (f"{len(agree)} strongly witnessed samples sit below the batch's scale by factors that put their own "
            f"gradients at one norm, {clip:.6g}, as a client that clips each sample's gradient would leave them "
            f"(per-sample clipping, DP-SGD's max_grad_norm), which it did not declare; pass clip_norm={clip:.6g} "
            "(or the dp-sgd defense with that max_grad_norm) to certify under it")
    return replace(rec, samples=tuple(samples), notes=(*rec.notes, note))
