"""The loss drop: how far a client's local training lowered each record's loss.

For a :class:`~fedleak.updates.WeightUpdate` (weights sent, weights returned) the score of a record is its
cross-entropy at the sent weights minus its cross-entropy at the client's weights: a record the client trained
on drops further than one it did not. It is the natural read-out of the active server (Nasr, Shokri &
Houmansadr, IEEE S&P 2019), which first raises the candidates' loss by gradient ascent so that a member's loss
then falls sharply at the client who trains on it, while a non-member's stays high.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.errors import FedleakError
from fedleak.membership.alignment import sent_model
from fedleak.membership.base import MembershipAttack, Observation, Records, check_same_length
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_losses
from fedleak.updates import WeightUpdate


@register_membership_attack
@dataclass(frozen=True)
class LossDropAttack(MembershipAttack):
    name: ClassVar[str] = "loss-drop"
    summary: ClassVar[str] = "the record's loss at the sent weights minus its loss at the client's weights"
    source: ClassVar[str] = "active read-out, Nasr, Shokri & Houmansadr, IEEE S&P 2019"
    needs: ClassVar[frozenset[str]] = frozenset({"model", "update"})

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        update = observation.update
        if not isinstance(update, WeightUpdate):
            raise FedleakError("membership attack 'loss-drop' reads a client's weights: give "
                               "Observation(update=WeightUpdate(before, after, ...))")
        sent = sent_model(observation.model, update)
        after = copy.deepcopy(sent)
        after.load_state_dict({**after.state_dict(), **dict(update.after)})
        return check_same_length(record_losses(sent, records) - record_losses(after, records), records, self.name)
