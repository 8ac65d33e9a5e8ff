"""Optimisation-based reconstruction: DLG, iDLG, Inverting Gradients, and the machinery DLM shares.

Every attack here searches for dummy inputs ``x'`` (and, for DLG, soft labels) whose *simulated* client
update matches the observed one (algorithms spec §5-§6). The steps, one module each:

* :mod:`~fedleak.attacks.inversion.target`: the observed update as a :class:`Target`, batch size, labels;
* :mod:`~fedleak.attacks.inversion.unroll`: :class:`FunctionalModel`, the client's gradient or its local
  steps unrolled differentiably (FedAvg, learning rate learned);
* :mod:`~fedleak.attacks.inversion.objectives`: the matching objectives and total variation;
* :mod:`~fedleak.attacks.inversion.settings`: :class:`InversionSettings`, how a search runs, and its options;
* :mod:`~fedleak.attacks.inversion.search`: :func:`invert`, the search loop;
* :mod:`~fedleak.attacks.inversion.clock`: :class:`RunClock`, the time budget and progress bar of a run
  (shared by ``auto``'s stages), and :class:`StepDecay`, the learning-rate decay that fits the time;
* :mod:`~fedleak.attacks.inversion.prior`: :class:`Prior`, what is known before the search (``auto``);
* :mod:`~fedleak.attacks.inversion.attacks`: the shared driver and the registered ``dlg``, ``idlg``, ``ig``.

Every one takes the option ``defense`` (the client's defenses): the simulated update then goes through their
forward model before it is matched (:mod:`fedleak.attacks.defense_forward`, after ROG).
"""

from fedleak.attacks.inversion.attacks import (
    DLG_DEFAULTS,
    IDLG_DEFAULTS,
    IG_DEFAULTS,
    dlg_attack,
    idlg_attack,
    ig_attack,
    optimised_reason,
    run_optimization_attack,
    to_reconstruction,
)
from fedleak.attacks.inversion.clock import RunClock, StepDecay
from fedleak.attacks.inversion.objectives import (
    OBJECTIVES,
    CosineObjective,
    L2Objective,
    NormalizedObjective,
    Objective,
    total_variation,
)
from fedleak.attacks.inversion.prior import Estimate, Placement, Prior, place_estimates
from fedleak.attacks.inversion.search import InversionResult, invert
from fedleak.attacks.inversion.settings import InversionSettings, settings_from
from fedleak.attacks.inversion.target import (
    Target,
    batch_size_of,
    model_input_shape,
    prepare_target,
    resolve_labels,
)
from fedleak.attacks.inversion.unroll import UNROLL_OPTIMIZERS, FunctionalModel

__all__ = [
    "DLG_DEFAULTS",
    "IDLG_DEFAULTS",
    "IG_DEFAULTS",
    "OBJECTIVES",
    "UNROLL_OPTIMIZERS",
    "CosineObjective",
    "Estimate",
    "FunctionalModel",
    "InversionResult",
    "InversionSettings",
    "L2Objective",
    "NormalizedObjective",
    "Objective",
    "Placement",
    "Prior",
    "RunClock",
    "StepDecay",
    "Target",
    "batch_size_of",
    "dlg_attack",
    "idlg_attack",
    "ig_attack",
    "invert",
    "model_input_shape",
    "optimised_reason",
    "place_estimates",
    "prepare_target",
    "resolve_labels",
    "run_optimization_attack",
    "settings_from",
    "to_reconstruction",
    "total_variation",
]
