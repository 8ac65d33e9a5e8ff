"""The threat models of an audited federation, in a registry.

A :class:`Threat` says what the server sends (possibly malicious weights: ``tamper``), which client-side batch
transform the server ships (fishing, a :class:`fedleak.transforms.BatchTransform`), and which attack it runs on
each update. ``fedleak.fishing`` is imported only when a run asks for it.

The clients' defenses are not here: they are the registry of :mod:`fedleak.defenses` (``fedleak info`` lists
them), and the few that Flower realises itself are in :mod:`fedleak.federation.flower_native`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fedleak.errors import FedleakError
from fedleak.federation.node_data import NodeData
from fedleak.federation.settings import DataSplit, FederationSettings
from fedleak.registry import Registry
from fedleak.transforms import BatchTransform


def _import(module: str, name: str, purpose: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise FedleakError(f"{purpose} needs {module}.{name}, which this fedleak install does not have yet") from None


# ---------------------------------------------------------------------------------------------------
# Threat models


@dataclass(frozen=True)
class Threat:
    name: str
    description: str
    attack: str
    attack_options: Callable[[FederationSettings], dict[str, Any]]
    # shipped to the clients, built by each with what it holds of the data (its split, or a SuperNode's own data)
    transform: Callable[[FederationSettings, DataSplit | NodeData], BatchTransform | None]
    tamper: Callable[[nn.Module, int, FederationSettings, DataSplit], nn.Module] | None = None
    update_kind: str = "gradient"  # what the attack is given: a scaled gradient or the WeightUpdate


_THREATS: Registry[Threat] = Registry("threat")


def register_threat(threat: Threat) -> Threat:
    return _THREATS.register(threat.name, threat)


def get_threat(name: str) -> Threat:
    return _THREATS.get(name)


def available_threats() -> dict[str, str]:
    return {n: t.description for n, t in _THREATS.items()}


@dataclass(frozen=True)
class AuditAttack:
    """The attack a threat's server runs on every update, and its options."""

    name: str
    options: dict[str, Any]


def audit_attack(threat: Threat, settings: FederationSettings, model: nn.Module,
                 input_shape: tuple[int, ...], data_range: tuple[float, float] = (0.0, 1.0)) -> AuditAttack:
    """The threat's attack, or, where that is the exact exclusivity attack and it certifies nothing from this
    model's updates (:func:`~fedleak.attacks.auto.exact_route_barrier`: GELU, LayerNorm, residual paths, max-pooled
    conv layers, Dropout in training mode, ...), ``auto`` within ``settings.attack_budget`` seconds: a one-sample
    update is read from its first Linear layer, certified, and others are searched by IG, uncertified.
    ``data_range``: the data's, given to an attack that reads it (its registry entry says so)."""
    from fedleak.attacks import get_attack

    told = settings.loss.options()  # the clients' loss, for an attack that takes it (the settings check which)
    options = {**threat.attack_options(settings), "input_shape": input_shape,
               **get_attack(threat.attack).range_option(data_range), **told}
    if threat.update_kind != "gradient" or threat.attack != "exclusivity":
        return AuditAttack(threat.attack, options)
    from fedleak.attacks.auto import exact_route_barrier
    from fedleak.binary import as_two_class

    # one logit: the attacks read its two-class twin
    if not exact_route_barrier(as_two_class(model)[0], input_shape, training=settings.client_mode == "train"):
        return AuditAttack(threat.attack, options)
    return AuditAttack("auto", {"budget": settings.attack_budget, "progress": False, "input_shape": input_shape,
                                **get_attack("auto").range_option(data_range), **told})


def _no_transform(settings: FederationSettings, data: DataSplit | NodeData) -> None:
    return None


FISHING_DEFAULTS = {"targets_last": 3}  # 3 ExANs at the last layer: a one-step float32 delta certifies reliably


def _fishing(settings: FederationSettings, data: DataSplit | NodeData) -> BatchTransform:
    cls = _import("fedleak.fishing", "FishingTransform", "the fishing threat")
    asked = dict(settings.transform_options)
    # data normalised before the model: its pixels are fished, each channel in range (unless a range is asked)
    told = {} if data.normalization is None or "data_range" in asked else {"normalization": data.normalization}
    return cls(**{**FISHING_DEFAULTS, **told, **asked})


def _exclusivity_options(settings: FederationSettings) -> dict[str, Any]:
    # the server does not know the client's learning rate: the update's scale lr/M is unknown
    return {"known_scale": False}


def _trap(model: nn.Module, server_round: int, settings: FederationSettings, split: DataSplit) -> nn.Module:
    from fedleak.attacks.malicious import trap_weights

    return trap_weights(model, seed=settings.seed * 1000 + server_round, scale=settings.trap_scale)


def _imprint(model: nn.Module, server_round: int, settings: FederationSettings, split: DataSplit) -> nn.Module:
    from fedleak.attacks.malicious import imprint_weights

    if len(split.public_x) < 2:
        raise FedleakError("the imprint threat needs public data for its quantiles (public_size >= 2)")
    return imprint_weights(model, split.public_x, settings.imprint_bins or None,
                           seed=settings.seed * 1000 + server_round)


def _class_fishing(model: nn.Module, server_round: int, settings: FederationSettings, split: DataSplit) -> nn.Module:
    from fedleak.attacks.malicious import class_fishing_weights

    return class_fishing_weights(model, settings.fished_class, data_range=split.value_range)


register_threat(Threat("honest", "honest-but-curious server: only looks at the updates (exclusivity attack)",
                       "exclusivity", _exclusivity_options, _no_transform))
register_threat(Threat("fishing", "the server ships a batch transform (fedleak.fishing) that clients run before "
                       "computing their update; exclusivity attack", "exclusivity", _exclusivity_options, _fishing))
register_threat(Threat("trap-weights", "malicious weights: trap-weight first layer (Boenisch et al.)",
                       "trap-weights", lambda s: {}, _no_transform, _trap, update_kind="weights"))
register_threat(Threat("imprint", "malicious weights: imprint bins in the first layer (Robbing the Fed)",
                       "imprint", lambda s: {}, _no_transform, _imprint, update_kind="weights"))
register_threat(Threat("class-fishing", "malicious weights: an output layer that silences every class but one "
                       "(Wen et al.); the target class's samples, counted off the first layer", "class-fishing",
                       lambda s: {}, _no_transform, _class_fishing, update_kind="weights"))


def _membership_ascent(model: nn.Module, server_round: int, settings: FederationSettings,
                       split: DataSplit) -> nn.Module:
    tamper = _import("fedleak.federation.membership", "tamper_for_membership", "the membership-active threat")
    return tamper(model, server_round, settings, split)


register_threat(Threat("membership-active", "malicious weights: gradient ascent on the server's candidate records "
                       "(Nasr et al. active membership inference); exclusivity attack", "exclusivity",
                       _exclusivity_options, _no_transform, _membership_ascent))
