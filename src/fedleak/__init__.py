"""fedleak: what a federated-learning server can rebuild of its clients' data, and what stops it.

Public API (everything a user needs is importable from here)::

    import fedleak
    model = fedleak.make_mlp((1, 8, 8), [1024], 10)
    data = fedleak.load_dataset("digits")
    update = fedleak.compute_gradient_update(model, data.x[:8], data.y[:8])
    report = fedleak.analyze_exclusivity(model, data.x[:8], data.y[:8])
    rec = fedleak.reconstruct(model, update)              # attack="exclusivity"
    scores = fedleak.metrics.match(rec, data.x[:8], data.y[:8])
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fedleak.lazy import lazy_attributes

# The public names and the modules that define them. They are imported on first use (PEP 562), so that
# ``import fedleak`` stays cheap and the command line can answer Ctrl-C during start-up with one line.
_EXPORTS = {
    "metrics": "fedleak.metrics",
    "ExclusivityReport": "fedleak.analysis",
    "analyze_exclusivity": "fedleak.analysis",
    "reconstruct": "fedleak.api",
    "BinaryTwin": "fedleak.binary",
    "binary_twin": "fedleak.binary",
    "ExclusivityOptions": "fedleak.attacks",
    "available_attacks": "fedleak.attacks",
    "class_fishing_weights": "fedleak.attacks.malicious",
    "imprint_weights": "fedleak.attacks.malicious",
    "trap_weights": "fedleak.attacks.malicious",
    "fedavg_update": "fedleak.clients",
    "local_training": "fedleak.clients",
    "Dataset": "fedleak.data",
    "available_datasets": "fedleak.data",
    "load_dataset": "fedleak.data",
    "Normalization": "fedleak.data",
    "normalization": "fedleak.data",
    "DataError": "fedleak.errors",
    "FedleakError": "fedleak.errors",
    "ModelError": "fedleak.errors",
    "OptionError": "fedleak.errors",
    "OutputError": "fedleak.errors",
    "SolverError": "fedleak.errors",
    "UpdateError": "fedleak.errors",
    "Evaluation": "fedleak.evaluation",
    "EvaluationSettings": "fedleak.evaluation",
    "evaluate": "fedleak.evaluation",
    "available_defenses": "fedleak.defenses",
    "defend_update": "fedleak.defenses",
    "defended_gradient": "fedleak.defenses",
    "make_defense": "fedleak.defenses",
    "parse_defense": "fedleak.defenses",
    "FishingOptions": "fedleak.fishing",
    "FishingResult": "fedleak.fishing",
    "FishingTransform": "fedleak.fishing",
    "SampleFishing": "fedleak.fishing",
    "fish": "fedleak.fishing",
    "LogitsOf": "fedleak.logits_of",
    "MembershipMetrics": "fedleak.membership",
    "MembershipResult": "fedleak.membership",
    "MembershipSettings": "fedleak.membership",
    "available_membership_attacks": "fedleak.membership",
    "make_membership_attack": "fedleak.membership",
    "run_membership": "fedleak.membership",
    "score_membership": "fedleak.membership",
    "MLP": "fedleak.models",
    "load_mlp": "fedleak.models",
    "make_mlp": "fedleak.models",
    "save_mlp": "fedleak.models",
    "make_lenet": "fedleak.models.cnn",
    "make_convnet": "fedleak.models.convnet",
    "available_models": "fedleak.models.catalog",
    "load_model": "fedleak.models.zoo",
    "Network": "fedleak.nets",
    "as_network": "fedleak.nets",
    "Plan": "fedleak.plan",
    "plan": "fedleak.plan",
    "Reconstruction": "fedleak.reconstruction",
    "SampleRecovery": "fedleak.reconstruction",
    "ClientUpdate": "fedleak.updates",
    "GradientUpdate": "fedleak.updates",
    "WeightUpdate": "fedleak.updates",
    "compute_gradient_update": "fedleak.updates",
    "load_update": "fedleak.update_files",
    "read_update": "fedleak.captured",
    "save_update": "fedleak.update_files",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from fedleak import metrics
    from fedleak.analysis import ExclusivityReport, analyze_exclusivity
    from fedleak.api import reconstruct
    from fedleak.attacks import ExclusivityOptions, available_attacks
    from fedleak.attacks.malicious import class_fishing_weights, imprint_weights, trap_weights
    from fedleak.binary import BinaryTwin, binary_twin
    from fedleak.captured import read_update
    from fedleak.clients import fedavg_update, local_training
    from fedleak.data import Dataset, Normalization, available_datasets, load_dataset, normalization
    from fedleak.defenses import available_defenses, defend_update, defended_gradient, make_defense, parse_defense
    from fedleak.errors import DataError, FedleakError, ModelError, OptionError, OutputError, SolverError, UpdateError
    from fedleak.evaluation import Evaluation, EvaluationSettings, evaluate
    from fedleak.fishing import FishingOptions, FishingResult, FishingTransform, SampleFishing, fish
    from fedleak.logits_of import LogitsOf
    from fedleak.membership import (
        MembershipMetrics,
        MembershipResult,
        MembershipSettings,
        available_membership_attacks,
        make_membership_attack,
        run_membership,
        score_membership,
    )
    from fedleak.models import MLP, load_mlp, make_mlp, save_mlp
    from fedleak.models.catalog import available_models
    from fedleak.models.cnn import make_lenet
    from fedleak.models.convnet import make_convnet
    from fedleak.models.zoo import load_model
    from fedleak.nets import Network, as_network
    from fedleak.plan import Plan
    from fedleak.plan.planner import plan
    from fedleak.reconstruction import Reconstruction, SampleRecovery
    from fedleak.update_files import load_update, save_update
    from fedleak.updates import ClientUpdate, GradientUpdate, WeightUpdate, compute_gradient_update


__getattr__ = lazy_attributes("fedleak", _EXPORTS, globals(), submodules=True)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


try:
    __version__ = version("fedleak")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = sorted(_EXPORTS)
