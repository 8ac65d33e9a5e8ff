"""One sample, or a blend of like samples: samples that share its every active unit, its label and its loss vector's
direction.

A unit that fires for several samples weighs them by their loss vectors in every one of its rows; where those vectors
are parallel it weighs them alike at every unit, and a batch of ``k`` samples that share all their active units (at
every ReLU layer) and their label gives, up to second order in the spread of their logits, the update of one sample:
the blend of their inputs weighted by their losses, at about ``k`` times one sample's scale. Its witness rows agree
and its gradient explains the update within the client's rounding. Loss vectors are parallel whatever the inputs with
two classes (each a multiple of ``(1, -1)``), and on a model whose logits barely depend on its input (one trained
into a few live units, or diverged: its predictions are then about the same for every input); with three classes or
more on another model, where two samples' predictions coincide in every class: samples of one activation pattern meet
that by chance, but near-copies meet it by design (a sample and a copy of it moved by noise of 1e-3 of the range, whose
blend the rows give to about the square of that; on Fashion-MNIST and digits, batches made of such pairs were certified
as half as many samples, each 5e-4 to 5e-3 of the range from both copies).

Only the scale tells such a blend, and only where it is pinned: at a reported batch size ``M`` a sample of a
mean-loss gradient sits at ``1/M``, a blend of ``k`` at about ``k/M`` (read as an input the batch holds ``k`` times,
uncertified). Where the batch size is read off the samples' common scale instead (a plain gradient without
``num_examples``), a batch of ``k M'`` samples in ``M'`` such groups reads as ``M'`` samples; where the update's
factor is unknown (a weight change's learning rate), ``n`` certified samples at one factor may be ``k``-blends
whenever ``k n <= M``, on every model (near-copies are the data's doing, not the model's). Both occurred: a model
trained 200 steps on retina patches kept 2 of its 1,024 units live, and a two-sample gradient without
``num_examples`` was certified as one sample, 6% of the range away from both; and, on ten classes, batches of pairs of
near-copies and a drifting signal's readings, with and without ``num_examples``. So without ``num_examples`` nothing
is certified, on any model, and at an unknown factor only more than half of the reported batch at one factor is.

:func:`without_unexcluded_blends` withdraws those certificates; the inputs stay, marked by their route, and ``auto``
holds them (a search cannot tell a blend from a sample either).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fedleak.reconstruction import Reconstruction, SampleRecovery

MARK = "sample or blend"  # the route's mark of a sample a blend of like samples would give as well
#: a model whose difference of two logits moves by less than this over the data's range, in any direction probed, has
#: like loss vectors for every input (witness rows agree to about 1e-5 relative, a blend's by the loss vectors' spread)
FLAT = 1e-2

ALIKE_TWO = "with two classes a blend of samples that share all its active units and its label"
ALIKE_FLAT = ("the model's logits barely depend on its input (a difference of two of them moves by at most {flat:.1e} "
              "over the data's range), so a blend of samples that share all its active units and its label")
ALIKE_NEAR = ("a blend of near-copies (samples that share all its active units, its label and, to within about 1e-3, "
              "its prediction: a sample and copies of it moved by a little noise)")
UNREPORTED = ("rebuilt as the update's rows give it, but not certified: {alike} gives the same update as one sample, "
              "and only the batch size the client reports tells them apart; pass num_examples")
FEW = ("rebuilt as the update's rows give it, but not certified: {alike} gives the same update as one sample at a "
       "multiple of its scale, and the update's factor is unknown: {n} certified sample(s) at one factor could be "
       "blends of 2 or more each in a batch of {m}; a certificate needs more than half of the batch at one factor, "
       "or the scale pinned: pass learning_rate, the rate the server set, with a one-step weight change")


def unexcluded(alike: str, certified: int, reported: int | None, known_scale: bool) -> str:
    """Why ``certified`` samples may each be a blend of like samples (``alike``: why the model's loss vectors may be
    alike, :func:`why_alike`, empty where they are not; ``reported``: the batch size the client reported;
    ``known_scale``: each sample's scale is pinned by it), or empty where a blend would show at its scale. At an
    unknown factor with the batch size reported, blends of near-copies (:data:`ALIKE_NEAR`) are not excluded on any
    model."""
    if certified == 0:
        return ""
    if reported is None:
        return UNREPORTED.format(alike=alike or ALIKE_NEAR)
    if not known_scale and 2 * certified <= reported:
        return FEW.format(alike=alike or ALIKE_NEAR, n=certified, m=reported)
    return ""


def logit_spread(model: nn.Module, inputs: torch.Tensor, width: float, seed: int = 0, most: bool = False) -> float:
    """The least (``most``: the greatest), over ``inputs`` (a batch the model reads), of the most that a random
    zero-sum combination ``v`` of its logits (of unit norm, drawn with ``seed``) can move over a box of ``width``
    around each input, at the input's own local linear map: ``sum_i |d(v . z)/dx_i| width``. Where the logits do
    move, a random ``v`` moves too (it would have to be orthogonal to every row of the Jacobian's zero-sum part)."""
    x = inputs.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        z = model(x)
        v = torch.randn(z.shape[-1], generator=gen, dtype=torch.float64)
        v = (v - v.mean()) / (v - v.mean()).norm()
        g, = torch.autograd.grad((z @ v.to(z.dtype)).sum(), x)  # the samples apart: the model runs in eval mode
    spread = g.detach().flatten(1).abs().sum(1).double() * width
    return float(spread.max() if most else spread.min())


def why_alike(model: nn.Module, rec: Reconstruction, num_classes: int, width: float) -> str:
    """Why the certified samples of ``rec`` may all be blends of samples with like loss vectors (two classes; logits
    that barely depend on the input over ``width`` at every one of them), or empty. They share one scale, so one that
    is a sample makes it a sample's, at which a blend of ``k`` does not sit: the first certified sample is asked
    first, the rest only where its logits are flat."""
    if num_classes == 2:
        return ALIKE_TWO
    certified = rec.certified.nonzero().flatten()
    if len(certified) == 0:
        return ""
    dtype = next(model.parameters()).dtype
    spread = logit_spread(model, rec.inputs[certified[:1]].to(dtype), width)
    if spread >= FLAT or len(certified) == 1:
        return ALIKE_FLAT.format(flat=spread) if spread < FLAT else ""
    spread = max(spread, logit_spread(model, rec.inputs[certified[1:]].to(dtype), width, most=True))
    return ALIKE_FLAT.format(flat=spread) if spread < FLAT else ""


def without_unexcluded_blends(model: nn.Module, rec: Reconstruction, num_classes: int, reported: int | None,
                              known_scale: bool, width: float) -> Reconstruction:
    """``rec`` with its certificates withdrawn where each certified sample may be a blend of like samples
    (:func:`unexcluded`): its input kept, its route marked :data:`MARK`. ``width``: the data range's."""
    if rec.num_certified == 0 or not unexcluded("alike", rec.num_certified, reported, known_scale):
        return rec  # the scale tells a blend whatever the model: no need to ask it
    why = unexcluded(why_alike(model, rec, num_classes, width), rec.num_certified, reported, known_scale)
    return withdrawn(rec, why) if why else rec


def withdrawn(rec: Reconstruction, why: str) -> Reconstruction:
    """``rec`` with every certificate withdrawn for ``why`` (a blend of like samples not excluded): the inputs kept,
    their reason ``why``, their route marked :data:`MARK`, and a note."""
    samples = tuple(replace(s, certified=False, reason=why,
                            route=f"{s.route.split(' (')[0] or rec.attack} (uncertified, {MARK})")
                    if s.certified else s for s in rec.samples)
    return replace(rec, samples=samples, certified=torch.zeros(len(rec), dtype=torch.bool), batch_certified=False,
                   joint_residual=float("nan"), notes=(*rec.notes, why))


def blend_unexcluded(record: SampleRecovery) -> bool:
    """Whether ``record`` was withdrawn by :func:`without_unexcluded_blends`."""
    return record.route.endswith(f", {MARK})")
