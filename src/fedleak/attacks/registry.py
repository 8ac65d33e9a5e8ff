"""The attack registry: attacks are looked up by name, never dispatched with if/elif chains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from fedleak.reconstruction import Reconstruction
from fedleak.registry import Registry


class AttackFn(Protocol):
    def __call__(self, model: nn.Module, update: Any, /, **options: Any) -> Reconstruction: ...


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: its name, what it runs on, and a one-line description.

    ``needs_relu_network``: an exact attack, which runs only on a network :func:`fedleak.nets.as_network`
    reads (callers such as the federation's strategy check the model up front); the optimisation attacks,
    which need only autograd, leave it False.
    """

    name: str
    run: AttackFn
    update_kinds: tuple[str, ...]  # "gradient" and/or "weights"
    description: str
    needs_relu_network: bool = False


_ATTACKS: Registry[AttackInfo] = Registry("attack")


def register_attack(
    name: str, *, update_kinds: tuple[str, ...] = ("gradient",), description: str = "",
    needs_relu_network: bool = False,
) -> Callable[[AttackFn], AttackFn]:
    """Decorator that registers ``fn`` under ``name``."""

    def make(fn: AttackFn) -> AttackInfo:
        return AttackInfo(name, fn, update_kinds, description or (fn.__doc__ or "").strip().split("\n")[0],
                          needs_relu_network=needs_relu_network)

    return _ATTACKS.decorator(name, make)


def get_attack(name: str) -> AttackInfo:
    """The attack registered as ``name``; :class:`~fedleak.errors.FedleakError` listing the others if none is."""
    return _ATTACKS.get(name)


def available_attacks() -> dict[str, AttackInfo]:
    return dict(_ATTACKS.items())
