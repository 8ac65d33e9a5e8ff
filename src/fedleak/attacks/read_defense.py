"""Defenses an update shows without being declared, read as the defense the attacks model.

* clipping by value (``clip_grad_value_``, :mod:`fedleak.clipped_values`): the largest magnitude held by several
  units, which no unclipped gradient shows; read as ``value-clipping`` with that bound (``certain``);
* clipping per layer (:mod:`fedleak.clipped_norms`): two or more layers at one L2 norm; read as
  ``clipping(per="layer")`` at that norm, a hypothesis the exclusivity attack's certificate tests (a chance agreement
  of two layers' norms makes it measure factors of 1).

The exclusivity attack reads them after a run that certified less than the whole batch (clipping per layer after
one that certified nothing: the layers' different factors break every certificate); the optimisation attacks before
they search (their forward model). A client's declared defense always comes first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedleak.clipped_norms import read_layer_clip
from fedleak.clipped_values import read_value_clip
from fedleak.defenses.base import Defense
from fedleak.defenses.clipping import Clipping, ValueClipping


@dataclass(frozen=True)
class ReadDefense:
    """A defense read off an update: the ``defense`` the attacks model, the ``evidence`` in words, and whether the
    values prove it (``certain``) or only suggest it."""

    defense: Defense
    evidence: str
    certain: bool


def read_defense(tensors: Mapping[str, torch.Tensor], per_layer: bool = True) -> ReadDefense | None:
    """The defense a gradient (name -> tensor) shows, or None; ``per_layer=False`` looks for clipping by value only
    (one pass over the update instead of two)."""
    clip = read_value_clip(tensors)
    if clip is not None:
        return ReadDefense(ValueClipping(bound=clip.bound), clip.describe(), True)
    layers = read_layer_clip(tensors) if per_layer else None
    if layers is not None:
        return ReadDefense(Clipping(bound=layers.bound, per="layer"), layers.describe(), False)
    return None
