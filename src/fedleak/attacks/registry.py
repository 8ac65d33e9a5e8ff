"""The attack registry: attacks are looked up by name, never dispatched with if/elif chains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from fedleak.errors import FedleakError
from fedleak.reconstruction import Reconstruction


class AttackFn(Protocol):
    def __call__(self, model: nn.Module, update: Any, /, **options: Any) -> Reconstruction: ...


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: its name, what it runs on, and a one-line description."""

    name: str
    run: AttackFn
    update_kinds: tuple[str, ...]  # "gradient" and/or "weights"
    description: str


_ATTACKS: dict[str, AttackInfo] = {}


def register_attack(
    name: str, *, update_kinds: tuple[str, ...] = ("gradient",), description: str = ""
) -> Callable[[AttackFn], AttackFn]:
    """Decorator that registers ``fn`` under ``name``."""

    def decorator(fn: AttackFn) -> AttackFn:
        if name in _ATTACKS:
            raise RuntimeError(f"attack '{name}' is registered twice")
        _ATTACKS[name] = AttackInfo(name, fn, update_kinds, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorator


def get_attack(name: str) -> AttackInfo:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise FedleakError(f"unknown attack '{name}'; available: {', '.join(sorted(_ATTACKS))}") from None


def available_attacks() -> dict[str, AttackInfo]:
    return dict(_ATTACKS)
