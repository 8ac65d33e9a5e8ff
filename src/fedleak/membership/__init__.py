"""Membership inference: was this record in the training data of the model (or the client's update) I see?

Build an attack by name (``make_membership_attack("loss")``), list them (:func:`membership_attack_names`,
:func:`available_membership_attacks`), score records (``attack.score(Observation(model), Records(x, y))``: one
float per record, higher meaning more likely a member) and judge the scores as the field does
(:func:`score_membership`: ROC, AUC, balanced accuracy, TPR at 1 % and 0.1 % FPR).

Importing this package imports no attack (and no torch); everything is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedleak.lazy import lazy_attributes
from fedleak.membership.catalog import MembershipSpec
from fedleak.membership.registry import (
    available_membership_attacks,
    membership_attack_class,
    membership_attack_names,
    register_membership_attack,
)

if TYPE_CHECKING:
    from fedleak.membership.base import (
        MembershipAttack,
        Observation,
        Records,
        Reference,
        Round,
        ShadowModel,
        Trainer,
        make_membership_attack,
        parse_membership_attack,
    )
    from fedleak.membership.experiment import AttackOutcome, MembershipResult, MembershipSettings, run_membership
    from fedleak.membership.metrics import MembershipMetrics, score_membership
    from fedleak.membership.training import TrainingRecipe

_LAZY = {
    **{name: "fedleak.membership.base" for name in (
        "MembershipAttack", "Observation", "Records", "Reference", "Round", "ShadowModel", "Trainer",
        "make_membership_attack", "parse_membership_attack")},
    **{name: "fedleak.membership.metrics" for name in ("MembershipMetrics", "score_membership")},
    **{name: "fedleak.membership.experiment" for name in (
        "AttackOutcome", "MembershipResult", "MembershipSettings", "run_membership")},
    "TrainingRecipe": "fedleak.membership.training",
}

__all__ = sorted([*_LAZY, "MembershipSpec", "available_membership_attacks", "membership_attack_class",
                  "membership_attack_names", "register_membership_attack"])

__getattr__ = lazy_attributes("fedleak.membership", _LAZY, globals())
