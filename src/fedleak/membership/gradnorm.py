"""The gradient-norm attack: a training member sits near a minimum of its own loss, so its gradient is small.

The score is minus the L2 norm of the record's gradient (real autograd, batched per record with
:func:`torch.func.vmap`) w.r.t. every trainable parameter, or w.r.t. one parameter tensor (``parameter``, a name
of ``model.named_parameters()``): the per-layer form of the features Nasr et al. (IEEE S&P 2019) analyse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedleak.errors import OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, check_same_length
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import gradient_norms


@register_membership_attack
@dataclass(frozen=True)
class GradientNormAttack(MembershipAttack):
    name: ClassVar[str] = "gradient-norm"
    summary: ClassVar[str] = "minus the L2 norm of the record's loss gradient (all parameters, or one tensor)"
    source: ClassVar[str] = "gradient-norm features, Nasr, Shokri & Houmansadr, IEEE S&P 2019"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    parameter: str = ""

    def check(self) -> None:
        if not isinstance(self.parameter, str):
            raise OptionError(f"option parameter of gradient-norm must be a parameter name, got {self.parameter!r}")

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        names = [n for n, p in observation.model.named_parameters() if p.requires_grad]
        if self.parameter and self.parameter not in names:
            raise OptionError(f"gradient-norm: the model has no trainable parameter '{self.parameter}'; "
                              f"its parameters: {names}")
        norms = gradient_norms(observation.model, records)
        return check_same_length(-norms[self.parameter], records, self.name)
