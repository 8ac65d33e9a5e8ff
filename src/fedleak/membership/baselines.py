"""The output-only baselines: a member's loss is lower and its true-class confidence higher than a non-member's.

* ``loss``: minus the cross-entropy (Yeom et al., CSF 2018);
* ``confidence``: the softmax probability of the true class (Salem et al., NDSS 2019);
* ``modified-entropy``: minus Song & Mittal's (USENIX Security 2021) modified entropy
  ``-(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``, which is low for confident correct predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.membership.base import MembershipAttack, Observation, Records, check_same_length
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_logits, record_losses

TINY = 1e-30


@register_membership_attack
@dataclass(frozen=True)
class LossAttack(MembershipAttack):
    name: ClassVar[str] = "loss"
    summary: ClassVar[str] = "minus the record's cross-entropy loss under the model"
    source: ClassVar[str] = "LOSS attack, Yeom et al. 2018"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        return check_same_length(-record_losses(observation.model, records), records, self.name)


@register_membership_attack
@dataclass(frozen=True)
class ConfidenceAttack(MembershipAttack):
    name: ClassVar[str] = "confidence"
    summary: ClassVar[str] = "the model's probability of the record's true class"
    source: ClassVar[str] = "confidence attack, Salem et al. 2019"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        probs = torch.softmax(record_logits(observation.model, records), dim=1)
        return check_same_length(probs.gather(1, records.labels.long().view(-1, 1)).squeeze(1), records, self.name)


@register_membership_attack
@dataclass(frozen=True)
class ModifiedEntropyAttack(MembershipAttack):
    name: ClassVar[str] = "modified-entropy"
    summary: ClassVar[str] = "minus the modified prediction entropy (label-aware)"
    source: ClassVar[str] = "Song & Mittal 2021"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        probs = torch.softmax(record_logits(observation.model, records), dim=1)
        true = torch.nn.functional.one_hot(records.labels.long(), probs.shape[1]).bool()
        p_true = probs[true]
        own = -(1 - p_true) * torch.log(p_true.clamp_min(TINY))
        rest = -(probs * torch.log((1 - probs).clamp_min(TINY))).masked_fill(true, 0.0).sum(1)
        return check_same_length(-(own + rest), records, self.name)
