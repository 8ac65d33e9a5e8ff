"""The scenarios an audit runs: who changes the client's batch or update before the attack sees it.

Two kinds, one record (:class:`AuditedScenario`):

* a *registered scenario*: a named client-side :class:`~fedleak.transforms.BatchTransform` (``plain``: an
  honest client; ``fished``: the curious server's fishing hook; plug-ins with :func:`register_scenario`);
* a *defense*: a spec of the defense registry (``"top-k:ratio=0.1"``, ``"mixup"``, ``"dp-sgd:..."``; a ``"+"``
  combines), named by its stack's label (``top-k(ratio=0.1)``).

Every scenario's client computes its update with :func:`fedleak.defenses.defended_gradient` (the registered
transform first, then the stack; the plain client's stack is empty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedleak.data import Dataset
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.registry import Registry
from fedleak.transforms import BatchTransform, Identity

if TYPE_CHECKING:
    from fedleak.audit.settings import AuditSettings

ScenarioFactory = Callable[["AuditSettings", Dataset], BatchTransform]
_SCENARIOS: Registry[tuple[ScenarioFactory, str]] = Registry("scenario")


def register_scenario(name: str, description: str) -> Callable[[ScenarioFactory], ScenarioFactory]:
    """Decorator that makes ``factory(settings, data) -> BatchTransform`` the audit scenario ``name``."""
    return _SCENARIOS.decorator(name, lambda factory: (factory, description))


def available_scenarios() -> dict[str, str]:
    return {name: desc for name, (_, desc) in _SCENARIOS.items()}


@register_scenario("plain", "an honest client: the batch as it is")
def _plain(settings: AuditSettings, data: Dataset) -> BatchTransform:
    return Identity()


@register_scenario("fished", "the curious server's client code fishes each batch (LP perturbation)")
def _fished(settings: AuditSettings, data: Dataset) -> BatchTransform:
    from fedleak.fishing import FishingTransform

    # valid data (normalised data: fished in pixels, each channel in range); LPs on all cores
    told = {"data_range": data.value_range} if data.normalization is None else {"normalization": data.normalization}
    return FishingTransform(**told, workers=None)


@dataclass(frozen=True)
class AuditedScenario:
    """One audited scenario: its ``name`` (a registered scenario, or a defense stack's label), what it is, the
    registered ``transform`` (None for a defense) and the client's ``stack`` (as given; :attr:`bound` fills in
    the data's range and classes)."""

    name: str
    description: str
    transform: BatchTransform | None
    stack: DefenseStack
    bound: DefenseStack


def defense_label(spec: str) -> str:
    """The scenario name of a defense spec: its stack's label (OptionError for an unknown defense or parameter)."""
    stack = DefenseStack.of(spec)
    if not stack:
        raise FedleakError(f"the defense spec {spec!r} names no defense")
    return stack.label


def describe_stack(stack: DefenseStack) -> str:
    return "; ".join(f"{d.stage.value} defense {d.name}: {d.summary} ({d.source})" for d in stack.defenses)


def audited_scenarios(settings: AuditSettings, data: Dataset) -> dict[str, AuditedScenario]:
    """Every scenario of ``settings``, by name, in order: the registered ones, then one per defense spec."""
    out: dict[str, AuditedScenario] = {}
    for name in settings.scenarios:
        factory, description = _SCENARIOS.get(name)
        out[name] = AuditedScenario(name, description, factory(settings, data), DefenseStack(), DefenseStack())
    for spec in settings.defenses:
        stack = DefenseStack.of(spec)
        bound = stack.bind(data_range=data.value_range, num_classes=data.num_classes, normalization=data.normalization)
        out[stack.label] = AuditedScenario(stack.label, describe_stack(stack), None, stack, bound)
    return out
