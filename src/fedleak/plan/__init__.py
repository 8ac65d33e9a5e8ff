"""Before any attack: which attacks apply to a model and update, and why, in numbers (:func:`plan`).

* :mod:`~fedleak.plan.planner` -- :func:`plan`, which puts the parts together;
* :mod:`~fedleak.plan.samples`, :mod:`~fedleak.plan.activity` -- the inputs counted on, and what is counted;
* :mod:`~fedleak.plan.conv` -- conv blocks: equations vs unknowns, as the attack counts them;
* :mod:`~fedleak.plan.exans`, :mod:`~fedleak.plan.widen` -- dense layers: ExANs at a batch size, wider layers;
* :mod:`~fedleak.plan.proposal` -- the smallest change that lets the route apply, checked;
* :mod:`~fedleak.plan.advice`, :mod:`~fedleak.plan.verdict` -- which attacks to run, and the verdict line;
* :mod:`~fedleak.plan.result`, :mod:`~fedleak.plan.text` -- the typed :class:`Plan`, its dict and its text.

``fedleak.plan`` is both this package and the function: the package is callable (``fedleak.plan(model, ...)``
calls :func:`plan`), so the name means the same whichever was imported first.
"""

import sys
import types

from fedleak.plan.advice import ADVISORS, RouteFacts
from fedleak.plan.planner import DEFAULT_BATCH_SIZES, DEFAULT_TARGET, plan
from fedleak.plan.result import (
    AttackAdvice,
    BatchEstimate,
    Change,
    ConvBlockPlan,
    DenseAtBatch,
    DenseLayerPlan,
    Evidence,
    LayerPlan,
    Plan,
    Proposal,
)

__all__ = ["ADVISORS", "AttackAdvice", "BatchEstimate", "Change", "ConvBlockPlan", "DEFAULT_BATCH_SIZES",
           "DEFAULT_TARGET", "DenseAtBatch", "DenseLayerPlan", "Evidence", "LayerPlan", "Plan", "Proposal",
           "RouteFacts", "plan"]


class _CallablePackage(types.ModuleType):
    """This package, callable as :func:`plan` (``import fedleak.plan`` binds the package to ``fedleak.plan``)."""

    def __call__(self, *args, **kwargs) -> Plan:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
