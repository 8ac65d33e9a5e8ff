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

from fedleak import metrics
from fedleak.analysis import ExclusivityReport, analyze_exclusivity
from fedleak.api import reconstruct
from fedleak.attacks import ExclusivityOptions, available_attacks
from fedleak.attacks.malicious import imprint_weights, trap_weights
from fedleak.clients import fedavg_update, local_training
from fedleak.data import Dataset, available_datasets, load_dataset
from fedleak.errors import DataError, FedleakError, ModelError, SolverError, UpdateError
from fedleak.fishing import FishingOptions, FishingResult, FishingTransform, SampleFishing, fish
from fedleak.models import MLP, load_mlp, make_mlp, save_mlp
from fedleak.models.cnn import make_lenet
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import (
    ClientUpdate,
    GradientUpdate,
    WeightUpdate,
    compute_gradient_update,
    load_update,
    save_update,
)

try:
    __version__ = version("fedleak")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "ClientUpdate",
    "DataError",
    "Dataset",
    "ExclusivityOptions",
    "ExclusivityReport",
    "FedleakError",
    "FishingOptions",
    "FishingResult",
    "FishingTransform",
    "GradientUpdate",
    "MLP",
    "ModelError",
    "Reconstruction",
    "SampleFishing",
    "SampleRecovery",
    "SolverError",
    "UpdateError",
    "WeightUpdate",
    "analyze_exclusivity",
    "available_attacks",
    "available_datasets",
    "compute_gradient_update",
    "fedavg_update",
    "fish",
    "imprint_weights",
    "load_dataset",
    "load_update",
    "load_mlp",
    "local_training",
    "make_lenet",
    "make_mlp",
    "metrics",
    "reconstruct",
    "save_mlp",
    "save_update",
    "trap_weights",
]
