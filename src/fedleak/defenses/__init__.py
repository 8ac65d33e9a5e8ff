"""Client-side defenses against leakage from updates, all in one registry (see :mod:`fedleak.defenses.base`).

Build one by name (``make_defense("qsgd", levels=4)``, ``parse_defense("top-k:ratio=0.1")``), list them with
:func:`available_defenses`, and run them with :func:`defended_gradient` (a FedSGD client's batch),
:func:`defend_update` (filters on a finished update) or in a federation (``fedleak federate --defense``).

Importing this package imports no defense (and no torch): the built-ins are listed in
:mod:`fedleak.defenses.catalog`; everything else is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedleak.defenses.catalog import DefenseSpec
from fedleak.defenses.registry import (
    available_defenses,
    defense_class,
    defense_classes,
    defense_names,
    register_defense,
)
from fedleak.lazy import lazy_attributes

if TYPE_CHECKING:
    from fedleak.defenses.base import (
        Accounting,
        BatchDefense,
        ClientBatch,
        Defense,
        Privacy,
        Stage,
        StepDefense,
        UpdateFilter,
        make_defense,
        parse_defense,
    )
    from fedleak.defenses.exclusivity_reduction import ExclusivityReduction, reduce_exclusivity
    from fedleak.defenses.reduction_results import ReducedSample, ReductionOptions, ReductionResult
    from fedleak.defenses.stack import DefendedUpdate, DefenseStack, defend_update, defended_gradient

_LAZY = {
    **{name: "fedleak.defenses.base" for name in (
        "Accounting", "BatchDefense", "ClientBatch", "Defense", "Privacy", "Stage", "StepDefense", "UpdateFilter",
        "make_defense", "parse_defense")},
    **{name: "fedleak.defenses.exclusivity_reduction" for name in ("ExclusivityReduction", "reduce_exclusivity")},
    **{name: "fedleak.defenses.reduction_results" for name in ("ReducedSample", "ReductionOptions", "ReductionResult")},
    **{name: "fedleak.defenses.stack" for name in (
        "DefendedUpdate", "DefenseStack", "defend_update", "defended_gradient")},
}

__all__ = sorted([*_LAZY, "DefenseSpec", "available_defenses", "defense_class", "defense_classes", "defense_names",
                  "register_defense"])

__getattr__ = lazy_attributes("fedleak.defenses", _LAZY, globals())
