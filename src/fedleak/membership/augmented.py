"""Membership inference against a model trained with data augmentation: the loss over a record's augmented views.

A model trained on random flips and shifts of its members (:mod:`fedleak.defenses.augmentation`) fits the augmented
views, not the record as it is, so the LOSS attack, which queries the record once, sees less of its training.
Augmentation-aware attacks query the record's views as the training drew them (Yu et al., AAAI 2021;
Choquette-Choo et al., ICML 2021, whose label-only attack counts the views the model gets right): this one scores
minus the cross-entropy averaged over every flip and shift an ``Augmentation(flip, padding)`` can draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedleak.defenses.augmentation import Augmentation
from fedleak.errors import OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, check_same_length
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_losses


@register_membership_attack
@dataclass(frozen=True)
class AugmentedLossAttack(MembershipAttack):
    """Minus the record's cross-entropy averaged over its ``2 x (2 padding + 1)^2`` flips and shifts (without
    ``flip``: its shifts only); ``fill`` is what a shift moves in (None: the lowest value of the records scored,
    the data's black)."""

    name: ClassVar[str] = "augmented-loss"
    summary: ClassVar[str] = "minus the record's cross-entropy averaged over its flips and shifts"
    source: ClassVar[str] = ("augmentation-aware membership inference, Yu et al. AAAI 2021; Choquette-Choo et al. "
                             "ICML 2021 (its loss form)")
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    padding: int = 2
    flip: bool = True
    fill: float | None = field(default=None, metadata={"low": None})

    def check(self) -> None:
        if not self.flip and self.padding == 0:
            raise OptionError(f"membership attack '{self.name}' with flip=False and padding=0 queries each record "
                              "once, as 'loss' does: set flip=True or a padding of at least 1")

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        if records.inputs.ndim != 4:
            raise OptionError(f"membership attack '{self.name}' needs image records (N, C, H, W), got "
                              f"{tuple(records.inputs.shape)}")
        h, w = records.inputs.shape[2:]
        if self.padding >= min(h, w):
            raise OptionError(f"option padding of membership attack '{self.name}' must be smaller than the records' "
                              f"height and width ({h} x {w}), got {self.padding}")
        fill = float(records.inputs.min()) if self.fill is None else self.fill
        views = Augmentation(flip=self.flip, padding=self.padding, fill=fill)
        total = torch.zeros(len(records), dtype=torch.float64)
        placements = views.placements()
        for placement in placements:
            moved = Records(views.place(records.inputs, placement), records.labels)
            total += record_losses(observation.model, moved).double()
        return check_same_length((-total / len(placements)).float(), records, self.name)
