"""Two classes: one sample, or a blend of samples that share its every active unit and its label.

With two classes every loss vector is a multiple of ``(1, -1)``, so the rows of a unit that fires for several samples
weigh them alike at every unit, and a batch of ``k`` samples that share all their active units (at every ReLU layer)
and their label gives, up to second order in the spread of their logits, the update of one sample: the blend of
their inputs weighted by their losses, at about ``k`` times one sample's scale. Its witness rows agree and its
gradient explains the update within the client's rounding. Only the scale tells the blend, and only where it is
pinned: at a reported batch size ``M`` a sample of a mean-loss gradient sits at ``1/M``, a blend of ``k`` at about
``k/M`` (read as an input the batch holds ``k`` times, uncertified). Where the batch size is read off the samples'
common scale instead (a plain gradient without ``num_examples``), a batch of ``k M'`` samples in ``M'`` such groups
reads as ``M'`` samples; where the update's factor is unknown (a weight change's learning rate), ``n`` certified
samples at one factor may be ``k``-blends whenever ``k n <= M``. Such batches occur where the model has few live units
(a ReLU layer most of whose units never fire: 1,022 of 1,024 on a model trained 200 steps on retina patches, where a
two-sample gradient without ``num_examples`` was certified as one sample, 6% of the range away from both).

:func:`without_unexcluded_blends` withdraws those certificates; the inputs stay, marked by their route, and ``auto``
holds them (a search cannot tell a blend from a sample either).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedleak.reconstruction import Reconstruction, SampleRecovery

MARK = "sample or blend"  # the route's mark of a sample a blend of like samples would give as well

UNREPORTED = ("rebuilt as the update's rows give it, but not certified: with two classes a blend of samples that share "
              "all its active units and its label gives the same update as one sample, and only the batch size the "
              "client reports tells them apart; pass num_examples")
FEW = ("rebuilt as the update's rows give it, but not certified: with two classes a blend of samples that share all "
       "its active units and its label gives the same update as one sample at a multiple of its scale, and the "
       "update's factor is unknown: {n} certified sample(s) at one factor could be blends of 2 or more each in a "
       "batch of {m}; a certificate needs more than half of the batch at one factor")


def unexcluded(num_classes: int, certified: int, reported: int | None, known_scale: bool) -> str:
    """Why ``certified`` samples of a ``num_classes``-class model's update may each be a blend of like samples
    (``reported``: the batch size the client reported; ``known_scale``: each sample's scale is pinned by it), or
    empty where a blend would show at its scale."""
    if num_classes != 2 or certified == 0:
        return ""
    if reported is None:
        return UNREPORTED
    if not known_scale and 2 * certified <= reported:
        return FEW.format(n=certified, m=reported)
    return ""


def without_unexcluded_blends(rec: Reconstruction, num_classes: int, reported: int | None,
                              known_scale: bool) -> Reconstruction:
    """``rec`` with its certificates withdrawn where each certified sample may be a blend of like samples
    (:func:`unexcluded`): its input kept, its route marked :data:`MARK`."""
    why = unexcluded(num_classes, rec.num_certified, reported, known_scale)
    if not why:
        return rec
    samples = tuple(replace(s, certified=False, reason=why, route=f"{s.route.split(' (')[0]} (uncertified, {MARK})")
                    if s.certified else s for s in rec.samples)
    return replace(rec, samples=samples, certified=torch.zeros(len(rec), dtype=torch.bool), batch_certified=False,
                   joint_residual=float("nan"), notes=(*rec.notes, why))


def blend_unexcluded(record: SampleRecovery) -> bool:
    """Whether ``record`` was withdrawn by :func:`without_unexcluded_blends`."""
    return record.route.endswith(f", {MARK})")
