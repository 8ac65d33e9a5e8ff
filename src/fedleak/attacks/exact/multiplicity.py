"""How many times the batch holds a rebuilt input the certificate did not take, read off its scale.

An input the batch holds ``k`` times enters a mean-loss gradient of ``M`` examples at ``k/M``: its exclusive rows
give it exactly, at ``k`` times the batch's common scale, while a blend of samples sits at a ratio of its
constituents' loss magnitudes. Two readings, with the batch's common scale known (``1/M``: the batch size reported,
or read off the certified samples):

* **once** (``k = 1``): an uncertified rebuilt input (too few witnesses, say) whose scale is the batch's to within
  :data:`ONCE_TOL`, of an MLP (below conv blocks an input is solved from its features, not read off rows), which the
  model does not classify with near certainty (:data:`SATURATED`: a saturated softmax gives blends of samples the
  batch's scale too; raw 0-255 LFW crops). It is returned uncertified, marked so that ``auto`` holds it instead of
  moving it in its search (measured in docs/attacks.md).
* **repeated** (``k >= 2``, drawn with replacement: a weighted sampler, oversampling a rare class): an uncertified
  rebuilt input at ``k`` times the scale, ``k`` whole (to :data:`REPEAT_TOL`). With the scale unknown
  (``known_scale=False``, the size reported: a weight update's scale holds the learning rate), the unit is the
  factor the certified inputs share (uncertified inputs at once or ``k`` times it), else ``M``-th of their scales'
  sum (every input certified; a batch that holds each of its samples twice, say). Near a model's
  initialisation a blend of ``k`` samples of one class sits at about ``k`` times the scale, so a repeated input is
  returned as ``k`` copies only where the inputs held once and the copies fill the batch and their whole gradient
  (real autograd, float64, every parameter) reproduces the observed one to the joint test's tolerance; the other
  candidates are then left out (the batch is whole without them). Else its reason names both readings.

Nothing is certified here: a blend of samples that fire the same neurons can sit at the scale too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.attacks.exact.batch_gradient import batch_gradient, gradient_residual
from fedleak.attacks.exact.certificate import BLENDS
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.nets import Network
from fedleak.reconstruction import Reconstruction, SampleRecovery

REPEAT_TOL = 1e-3  # a scale this close (relative) to a whole multiple of the batch's common scale reads as one
SATURATED = 1e-3  # an input the model classifies with probability above 1 - this is not held at the batch's scale
# an input held once sits this close (relative) to the batch's scale: 287 of 288 exact one-witness inputs did (99%
# within 6.3e-6; LFW, LFW faces, retina, Fashion-MNIST, default-init MLPs); a blend of LFW faces 4.3e-5 away did not
ONCE_TOL = 1e-5
REPEATED = "repeated"
ONCE = "at the batch's scale"


@dataclass(frozen=True)
class Repeat:
    """A rebuilt sample (``index`` in the reconstruction) that the batch holds ``times`` times."""

    index: int
    times: int


def read_off_scale(record: SampleRecovery) -> bool:
    """Whether this uncertified sample of the exclusivity attack is an input read off its scale (module docstring):
    held once at the batch's scale, or a copy of a repeated input; its record's route says so."""
    return record.route.endswith((f", {REPEATED})", f", {ONCE})"))


def marked(record: SampleRecovery, mark: str, reason: str) -> SampleRecovery:
    """``record``, uncertified, its route marked ``mark`` and its reason ``reason``."""
    return replace(record, certified=False, route=f"{record.route.split(' (')[0]} (uncertified, {mark})", reason=reason)


def held_once(records: list[SampleRecovery], logits: torch.Tensor, batch_size: int, opts: ExclusivityOptions,
              exact_values: bool) -> list[SampleRecovery]:
    """``records`` with the uncertified inputs held once at the batch's scale marked (module docstring); ``logits``:
    the certificate's forward pass of them (one row each); ``exact_values``: an MLP's update whose values are the
    client's float32 arithmetic (no known error, not a coarser format), so a scale read to :data:`ONCE_TOL` means
    what it says."""
    if (not exact_values or not opts.known_scale or opts.class_weights is not None or opts.clip_norm is not None
            or opts.train_dropout or opts.defense):
        return records
    unit = opts.common_scale(batch_size)
    sure_of = torch.softmax(logits.double(), 1).amax(1).tolist()
    return [marked(r, ONCE, f"{r.reason}; its scale is the batch's common scale to within {ONCE_TOL:g}, as a "
                            "sample's is and a blend's seldom is: auto holds it")
            if not r.certified and r.rebuilt and witnessed(r) and abs(r.scale / unit - 1) <= ONCE_TOL
            and sure_of[k] <= 1 - SATURATED else r for k, r in enumerate(records)]


def with_multiplicity(model: nn.Module, net: Network, grads: dict[str, torch.Tensor], rec: Reconstruction,
                      opts: ExclusivityOptions, batch_size: int | None) -> Reconstruction:
    """``rec`` with how many times the batch holds its uncertified inputs read (module docstring; those held once
    at the batch's scale are marked already, :func:`held_once`); ``grads``: the update the attack read,
    ``batch_size``: reported, or read off the certified samples' common scale."""
    if (rec.batch_certified or batch_size is None or opts.class_weights is not None or opts.clip_norm is not None
            or opts.train_dropout or opts.defense or len(rec.samples) != len(rec)):
        return rec
    sure = rec.certified.nonzero().flatten().tolist()
    samples = list(rec.samples)
    others = [k for k, r in enumerate(samples) if not r.certified and r.rebuilt]
    if opts.known_scale:
        unit = opts.common_scale(batch_size)
        once = [k for k in others if read_off_scale(samples[k])]
        readings = [(unit, sure + once, [k for k in others if k not in once])]
    elif sure:  # the factor the certified samples share (a repeat uncertified), or M units among them (all found)
        scales = sorted(samples[k].scale for k in sure)
        readings = [(scales[len(scales) // 2], [], sure + others), (sum(scales) / batch_size, [], sure)]
    else:
        return rec
    rec = replace(rec, samples=tuple(samples))
    named: list[Repeat] = []
    why = "not all of the batch is rebuilt, so its whole gradient cannot confirm it"
    for unit, held, pool in readings:
        repeats = whole_multiples(samples, unit, pool)
        ones = [] if opts.known_scale else [k for k in others if abs(samples[k].scale / unit - 1) <= REPEAT_TOL]
        single = held + ones + [k for k in sure if k not in held and k not in {r.index for r in repeats}]
        named = named or [r for r in repeats if not samples[r.index].certified]
        if not repeats or len(single) + sum(r.times for r in repeats) != batch_size:
            continue
        index = single + [r.index for r in repeats for _ in range(r.times)]
        dev = next(model.parameters()).device
        pred = batch_gradient(model, net, rec.inputs[index].to(dev), rec.labels[index].to(dev), opts.smoothing,
                              focal_gamma=opts.focal_gamma)
        residual, _ = gradient_residual(pred, {k: g.to(dev) for k, g in grads.items()},
                                        unit if opts.known_scale else None)
        if residual <= opts.batch_tol:
            return whole(rec, single, repeats, residual, batch_size)
        why = (f"but the batch rebuilt with its copies leaves a relative gradient residual of {residual:.1e} (more "
               f"than {opts.batch_tol:g}): a blend of samples")
    for r in named:
        s = samples[r.index]
        samples[r.index] = replace(s, reason=f"{s.reason}; its scale is {r.times} times the batch's common scale, as "
                                             f"an input the batch holds {r.times} times (drawn with replacement) "
                                             f"would have, {why}")
    return replace(rec, samples=tuple(samples))


def witnessed(record: SampleRecovery) -> bool:
    """Whether the sample has a witness row at the last ReLU layer (its scale was read off one)."""
    return bool(record.witnesses) and record.witnesses[-1] >= 1


def whole_multiples(samples: tuple[SampleRecovery, ...], unit: float, among: list[int]) -> list[Repeat]:
    """The samples of ``among`` whose scale is a whole multiple ``k >= 2`` of ``unit`` (to :data:`REPEAT_TOL`)."""
    out = []
    for k in among:
        ratio = samples[k].scale / unit
        if not math.isfinite(ratio):
            continue
        times = round(ratio)
        if times >= 2 and abs(ratio - times) <= REPEAT_TOL * times:
            out.append(Repeat(k, times))
    return out


def whole(rec: Reconstruction, single: list[int], repeats: list[Repeat], residual: float,
          batch_size: int) -> Reconstruction:
    """The batch as ``single`` (held once) and ``repeats`` fill it, whose whole gradient left ``residual``."""
    rows = list(single)
    samples = [marked(s, ONCE, f"{s.reason}; at the batch's common scale, and the batch rebuilt with it reproduces "
                               f"the whole observed gradient (relative residual {residual:.1e}): auto holds it")
               if not s.certified and not read_off_scale(s) else s for s in (rec.samples[k] for k in single)]
    for r in repeats:
        s = rec.samples[r.index]
        said = (f"read as an input the batch holds {r.times} times (drawn with replacement): its scale is {r.times} "
                f"times the batch's common scale, and the batch rebuilt with {r.times} copies of it reproduces the "
                f"whole observed gradient (relative residual {residual:.1e})")
        copy = marked(s, REPEATED, f"{said}; a copy is not certified: a blend of samples that fire the same neurons "
                                   "can sit at a whole multiple of the scale and reproduce the gradient too")
        first = replace(s, reason=f"certified; {said}") if s.certified else copy
        rows += [r.index] * r.times
        samples += [first] + [copy] * (r.times - 1)
    left = len(rec) - len(set(rows))
    index = torch.tensor(rows, dtype=torch.long)
    certified = torch.tensor([s.certified for s in samples], dtype=torch.bool)
    copies = sum(r.times for r in repeats)
    note = (f"{len(repeats)} input(s) the batch holds more than once ({copies} of its {batch_size} examples), read "
            f"off their scales and checked by the whole gradient (relative residual {residual:.1e}); the copies are "
            "not certified" + (f"; {left} other candidate(s) left out: the batch is whole without them" if left
                               else ""))
    notes = tuple(n for n in rec.notes if not n.endswith(BLENDS))  # the repeated samples were counted as blends
    return replace(rec, inputs=rec.inputs[index], labels=rec.labels[index], certified=certified,
                   samples=tuple(samples), batch_size=batch_size, missing_reason="", notes=(*notes, note))
