"""Clipping of what a client sends: by norm (per layer, per tensor or of the whole update), or by value.

``clipping`` scales each group of the update down to L2 norm at most ``bound`` (a group under the bound is
left as it is). The groups (``per``):

* ``"layer"``: a module's parameters together (names sharing the prefix before the last ``.``: ``fc1.weight``
  and ``fc1.bias`` get one factor), the per-layer clipping of McMahan et al. ("Learning differentially private
  recurrent language models", ICLR 2018) and of Abadi et al. ("Deep learning with differential privacy",
  CCS 2016);
* ``"tensor"``: every tensor on its own;
* ``"update"``: the whole update with one factor (flat clipping).

Clipping alone adds no noise and gives no privacy guarantee; it is what the noise mechanisms are calibrated
to (:mod:`fedleak.defenses.noise`), and on its own it only rescales. Its forward model for a defense-aware
attack is the same clipping, differentiable in the simulated update.

``value-clipping`` cuts every entry to ``[-bound, bound]``, as ``torch.nn.utils.clip_grad_value_`` does to a
gradient before it is sent: the entries beyond the bound become exactly ``±bound`` (what
:mod:`fedleak.clipped_values` reads off an update), the others are sent as they are. Its forward model is the same
cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.defenses.base import (
    ClientBatch,
    Tensors,
    UpdateFilter,
    check_choice,
    check_open_range,
    register_defense,
)

# the clipping group a parameter name belongs to, by grouping
GROUPINGS: dict[str, Callable[[str], str]] = {
    "layer": lambda name: name.rpartition(".")[0],
    "tensor": lambda name: name,
    "update": lambda name: "",
}


def clip_groups(update: Tensors, bound: float, group_of: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Every group of floating tensors of ``update`` (``group_of(name)``) scaled by ``min(1, bound / ‖group‖₂)``.

    Differentiable (autograd flows through the norms); a zero group stays zero.
    """
    members: dict[str, list[str]] = {}
    for name, t in update.items():
        if t.is_floating_point():
            members.setdefault(group_of(name), []).append(name)
    out = dict(update)
    for names in members.values():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(update[n]) for n in names]))
        factor = torch.clamp(bound / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
        for n in names:
            out[n] = update[n] * factor.to(update[n].dtype)
    return out


@register_defense
@dataclass(frozen=True)
class Clipping(UpdateFilter):
    """Scale each layer (``per="layer"``), tensor or the whole update down to L2 norm at most ``bound``."""

    name: ClassVar[str] = "clipping"
    summary: ClassVar[str] = "scale each layer / tensor / the whole update down to L2 norm <= bound"
    source: ClassVar[str] = "per-layer clipping, McMahan et al. 2018; Abadi et al. 2016"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"bound": 1.0}, {"bound": 0.1}, {"bound": 0.01})

    bound: float
    per: str = "layer"

    def check(self) -> None:
        check_open_range(self, "bound", 0.0, float("inf"))
        check_choice(self, "per", tuple(GROUPINGS))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return clip_groups(update, self.bound, GROUPINGS[self.per])

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        return clip_groups(simulated, self.bound, GROUPINGS[self.per])


@register_defense
@dataclass(frozen=True)
class ValueClipping(UpdateFilter):
    """Cut every entry of the update to ``[-bound, bound]`` (``torch.nn.utils.clip_grad_value_``)."""

    name: ClassVar[str] = "value-clipping"
    summary: ClassVar[str] = "cut every entry to [-bound, bound] (torch.nn.utils.clip_grad_value_)"
    source: ClassVar[str] = "gradient clipping by value, as torch.nn.utils.clip_grad_value_ applies it"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"bound": 0.1}, {"bound": 0.01}, {"bound": 0.001})

    bound: float

    def check(self) -> None:
        check_open_range(self, "bound", 0.0, float("inf"))

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.observe(update, update)

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        return {n: t.clamp(-self.bound, self.bound) if t.is_floating_point() else t for n, t in simulated.items()}
