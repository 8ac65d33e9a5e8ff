"""Reading a client's update directly: a record the client trained on pushed the update along its own gradient.

For each candidate record, its gradient at the weights the server sent (real autograd) is compared with the
update's direction: ``before - after`` of a :class:`~fedleak.updates.WeightUpdate` (the sum of the local
steps' gradients, times the learning rate) or a :class:`~fedleak.updates.GradientUpdate`'s gradient.

* ``cosine``: ``<g, u> / (|g| |u|)``, how well the record's gradient points along the update;
* ``projection``: ``<g, u> / |u|``, the length of the record's gradient along the update (larger for records
  with large gradients, members or not).

Over several local steps the weights move away from the sent ones, but the members' gradients still dominate
the update. ``rounds-alignment`` averages the cosine over a client's rounds (the paper's features over several
epochs / rounds): each round's record gradients are taken at that round's sent weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.errors import OptionError, UpdateError
from fedleak.membership.base import (
    ClientUpdate,
    MembershipAttack,
    Observation,
    Records,
    check_same_length,
)
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import flat_gradients, parameter_names
from fedleak.model_copy import copy_model
from fedleak.updates import GradientUpdate, check_matches_model

Measure = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cosine(grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return grads @ direction / (grads.norm(dim=1).clamp_min(1e-30) * direction.norm().clamp_min(1e-30))


def _projection(grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return grads @ direction / direction.norm().clamp_min(1e-30)


MEASURES: dict[str, Measure] = {"cosine": _cosine, "projection": _projection}


def sent_model(model: nn.Module, update: ClientUpdate) -> nn.Module:
    """The model at the weights the update was computed against (``model`` itself for a gradient update)."""
    if isinstance(update, GradientUpdate):
        return model
    at_sent = copy_model(model)
    own = at_sent.state_dict()
    unknown = sorted(set(update.before) - set(own))
    if unknown:
        raise UpdateError(f"the update's weights {unknown} are not the model's; it was computed for another model")
    at_sent.load_state_dict({**own, **dict(update.before)})
    return at_sent


def update_direction(model: nn.Module, update: ClientUpdate) -> torch.Tensor:
    """The update as one vector in the model's trainable-parameter order, pointing along the clients' gradient."""
    tensors = update.gradients if isinstance(update, GradientUpdate) else update.delta()
    names = parameter_names(model)
    chosen = {n: tensors[n] for n in names if n in tensors}
    check_matches_model(model, chosen)
    return torch.cat([chosen[n].flatten() for n in names]).to(torch.float64)


def alignment(model: nn.Module, update: ClientUpdate, records: Records, measure: Measure) -> torch.Tensor:
    at_sent = sent_model(model, update)
    direction = update_direction(at_sent, update)
    out = torch.empty(len(records), dtype=torch.float64)
    for start, grads in flat_gradients(at_sent, records):
        out[start:start + grads.shape[0]] = measure(grads, direction)
    return out


def check_measure(name: str, measure: str) -> Measure:
    if measure not in MEASURES:
        raise OptionError(f"option measure of {name} must be one of {sorted(MEASURES)}, got {measure!r}")
    return MEASURES[measure]


@register_membership_attack
@dataclass(frozen=True)
class UpdateAlignmentAttack(MembershipAttack):
    name: ClassVar[str] = "update-alignment"
    summary: ClassVar[str] = "alignment of the record's gradient at the sent weights with the client's update"
    source: ClassVar[str] = "gradient-update features, Nasr, Shokri & Houmansadr, IEEE S&P 2019"
    needs: ClassVar[frozenset[str]] = frozenset({"model", "update"})

    measure: str = "cosine"

    def check(self) -> None:
        check_measure(self.name, self.measure)

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        assert observation.update is not None
        scores = alignment(observation.model, observation.update, records, MEASURES[self.measure])
        return check_same_length(scores, records, self.name)


@register_membership_attack
@dataclass(frozen=True)
class RoundsAlignmentAttack(MembershipAttack):
    name: ClassVar[str] = "rounds-alignment"
    summary: ClassVar[str] = "update alignment averaged over the client's rounds"
    source: ClassVar[str] = "multi-round features, Nasr, Shokri & Houmansadr, IEEE S&P 2019"
    needs: ClassVar[frozenset[str]] = frozenset({"model", "rounds"})

    measure: str = "cosine"

    def check(self) -> None:
        check_measure(self.name, self.measure)

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        per_round = [alignment(r.model, r.update, records, MEASURES[self.measure]) for r in observation.rounds]
        return check_same_length(torch.stack(per_round).mean(0), records, self.name)
