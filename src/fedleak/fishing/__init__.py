"""Fishing (algorithms spec §4): client-side LP perturbations that make every sample reconstructable.

``fedleak.fish(model, inputs, labels, **options)`` perturbs a batch (any MLP or CNN
:func:`fedleak.nets.as_network` reads, data in any range); :class:`FishingTransform` is the
same as a client-side :class:`~fedleak.transforms.BatchTransform` hook (the curious server's client code);
LP backends live in a registry (:func:`available_solvers`, :func:`register_solver`).
"""

from fedleak.fishing.fisher import fish
from fedleak.fishing.hook import FishingTransform
from fedleak.fishing.perturb import FishingOptions, FishingResult, SampleFishing
from fedleak.fishing.solvers import LPSession, LPSolution, available_solvers, register_solver

__all__ = [
    "FishingOptions",
    "FishingResult",
    "FishingTransform",
    "LPSession",
    "LPSolution",
    "SampleFishing",
    "available_solvers",
    "fish",
    "register_solver",
]
