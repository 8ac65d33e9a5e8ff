"""Pluggable parts of an audited federation, each in a registry: threat models and client-side defenses.

* A :class:`Threat` says what the server sends (possibly malicious weights: ``tamper``), which
  client-side batch transform the server ships (fishing), and which attack it runs on each update.
* A :class:`Defense` is what a careful client does: a batch transform before computing the update
  (exclusivity reduction), a post-processing of its weight delta (noise, sparsification) and/or
  Flower's own DP (client-side fixed clipping mod + the server's DP wrapper strategy).

Transforms follow :class:`fedleak.transforms.BatchTransform`; post-processing follows
:class:`UpdatePostprocess`. Modules built elsewhere (``fedleak.fishing``, ``fedleak.defenses``) are
imported only when a run asks for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedleak.errors import FedleakError
from fedleak.federation.settings import DataSplit, FederationSettings
from fedleak.registry import Registry
from fedleak.transforms import BatchTransform


class UpdatePostprocess(Protocol):
    """``hook(delta, generator) -> delta``: a client's change to its weight delta ``before - after``."""

    def __call__(self, delta: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]: ...


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
    transform: Callable[[FederationSettings], BatchTransform | None]  # shipped to the clients
    tamper: Callable[[nn.Module, int, FederationSettings, DataSplit], nn.Module] | None = None
    update_kind: str = "gradient"  # what the attack is given: a scaled gradient or the WeightUpdate


_THREATS: Registry[Threat] = Registry("threat")
_DEFENSES: Registry[Defense] = Registry("defense")


def register_threat(threat: Threat) -> Threat:
    return _THREATS.register(threat.name, threat)


def get_threat(name: str) -> Threat:
    return _THREATS.get(name)


def available_threats() -> dict[str, str]:
    return {n: t.description for n, t in _THREATS.items()}


def _no_transform(settings: FederationSettings) -> None:
    return None


FISHING_DEFAULTS = {"targets_last": 3}  # 3 ExANs at the last layer: a one-step float32 delta certifies reliably


def _fishing(settings: FederationSettings) -> BatchTransform:
    cls = _import("fedleak.fishing", "FishingTransform", "the fishing threat")
    return cls(**{**FISHING_DEFAULTS, **dict(settings.transform_options)})


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
    return imprint_weights(model, split.public_x, settings.imprint_bins or None, seed=settings.seed * 1000 + server_round)


register_threat(Threat("honest", "honest-but-curious server: only looks at the updates (exclusivity attack)",
                       "exclusivity", _exclusivity_options, _no_transform))
register_threat(Threat("fishing", "the server ships a batch transform (fedleak.fishing) that clients run before "
                       "computing their update; exclusivity attack", "exclusivity", _exclusivity_options, _fishing))
register_threat(Threat("trap-weights", "malicious weights: trap-weight first layer (Boenisch et al.)",
                       "trap-weights", lambda s: {}, _no_transform, _trap, update_kind="weights"))
register_threat(Threat("imprint", "malicious weights: imprint bins in the first layer (Robbing the Fed)",
                       "imprint", lambda s: {}, _no_transform, _imprint, update_kind="weights"))


# ---------------------------------------------------------------------------------------------------
# Client-side defenses


@dataclass(frozen=True)
class Defense:
    name: str
    description: str
    transform: Callable[[FederationSettings], BatchTransform | None] = _no_transform
    postprocess: Callable[[FederationSettings], UpdatePostprocess | None] = lambda s: None
    flower_dp: bool = False


def register_defense(defense: Defense) -> Defense:
    return _DEFENSES.register(defense.name, defense)


def get_defense(name: str) -> Defense:
    return _DEFENSES.get(name)


def available_defenses() -> dict[str, str]:
    return {n: d.description for n, d in _DEFENSES.items()}


def _exclusivity_reduction(settings: FederationSettings) -> BatchTransform:
    cls = _import("fedleak.defenses", "ExclusivityReduction", "the exclusivity-reduction defense")
    return cls(**dict(settings.transform_options))


def _weight_noise(settings: FederationSettings) -> UpdatePostprocess:
    add_noise = _import("fedleak.defenses.weight_noise", "add_weight_noise", "the weight-noise defense")
    if settings.defense_strength <= 0:
        raise FedleakError("the weight-noise defense needs --defense-strength > 0 (the noise std)")

    def hook(delta: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        from fedleak.updates import GradientUpdate

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return dict(add_noise(GradientUpdate(dict(delta)), settings.defense_strength, seed=seed).gradients)

    return hook


def _sparsification(settings: FederationSettings) -> UpdatePostprocess:
    sparsify = _import("fedleak.defenses.sparsification", "sparsify_update", "the sparsification defense")
    if not 0 < settings.defense_strength < 1:
        raise FedleakError("the sparsification defense needs --defense-strength in (0, 1): the fraction dropped")

    def hook(delta: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        from fedleak.updates import GradientUpdate

        return dict(sparsify(GradientUpdate(dict(delta)), settings.defense_strength).gradients)

    return hook


register_defense(Defense("none", "no defense"))
register_defense(Defense("exclusivity-reduction", "client re-composes/perturbs its batch so that no neuron is "
                         "exclusive (fedleak.defenses.ExclusivityReduction)", transform=_exclusivity_reduction))
register_defense(Defense("weight-noise", "client adds Gaussian noise of std --defense-strength to its weight delta "
                         "(fedleak.defenses.weight_noise)", postprocess=_weight_noise))
register_defense(Defense("sparsification", "client drops the --defense-strength fraction of smallest entries of "
                         "its delta, per tensor (fedleak.defenses.sparsification)", postprocess=_sparsification))
register_defense(Defense("dp", "Flower's DP: clients clip their update (fixedclipping_mod), the server adds noise "
                         "of --defense-strength times --clip-norm (DifferentialPrivacyClientSideFixedClipping)",
                         flower_dp=True))
