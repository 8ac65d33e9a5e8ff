"""LiRA, offline (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022).

Shadow models trained like the target on the attacker's reference data (never on the candidates: the offline
variant, "out" models only) give, for each candidate record, the distribution of LiRA's statistic
``log p_y - log(1 - p_y)`` when the record is *not* a member: a Gaussian with the record's own mean over the
shadows and, with few shadows, one variance shared by all records (the paper's fixed-variance variant, which it
recommends below 64 shadows). The score is how many standard deviations the target's statistic lies above that
mean: a one-sided likelihood-ratio test, monotone in the paper's ``1 - Pr[Z > observed]``, without its saturation
at 1 that would tie the most confident members. With ``shadows`` of 4 to 16 small models this is the CPU-sized
version of the paper's 64 to 256.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedleak.errors import OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, Reference, check_same_length
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_logits, scaled_logit


@register_membership_attack
@dataclass(frozen=True)
class LiRAAttack(MembershipAttack):
    """Options: ``shadows`` out-models, ``fixed_variance`` (one variance for all records, else per record)."""

    name: ClassVar[str] = "lira"
    summary: ClassVar[str] = "offline likelihood-ratio test against shadow models' per-record statistics"
    source: ClassVar[str] = "LiRA, Carlini et al., IEEE S&P 2022 (offline, out-models)"
    needs: ClassVar[frozenset[str]] = frozenset({"model", "shadow"})

    shadows: int = 8
    fixed_variance: bool = True
    models: tuple[torch.nn.Module, ...] = field(default=(), init=False, repr=False, compare=False)

    def check(self) -> None:
        if self.shadows < 2:
            raise OptionError(f"option shadows of lira must be at least 2 (a variance needs two), got {self.shadows}")

    @property
    def fitted(self) -> bool:
        return bool(self.models)

    def fit(self, reference: Reference) -> LiRAAttack:
        fitted = dataclasses.replace(self)
        object.__setattr__(fitted, "models", tuple(reference.shadow(i).model for i in range(self.shadows)))
        return fitted

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        observed = scaled_logit(record_logits(observation.model, records), records.labels)
        out = torch.stack([scaled_logit(record_logits(m, records), records.labels) for m in self.models])
        mean = out.mean(0)
        std = out.std(0).pow(2).mean().sqrt() if self.fixed_variance else out.std(0)
        return check_same_length((observed - mean) / std.clamp_min(1e-6), records, self.name)
