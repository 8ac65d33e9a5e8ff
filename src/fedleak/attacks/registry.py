"""The attack registry: attacks are looked up by name, never dispatched with if/elif chains.

Built-in attacks are listed in :mod:`fedleak.attacks.catalog` and imported on first use, so listing them
(:func:`attack_specs`) imports neither torch nor any attack; :func:`get_attack` imports the one asked for and
:func:`available_attacks` all of them. Plug-ins register with the same decorator and need no catalog entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fedleak.attacks.catalog import ATTACK_CATALOG, AttackSpec
from fedleak.errors import FedleakError
from fedleak.registry import LazyRegistry

if TYPE_CHECKING:
    from torch import nn

    from fedleak.reconstruction import Reconstruction


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
    takes_defense: bool = False  # accepts the client's defenses as its ``defense`` option
    optimises: bool = False  # an optimisation attack: takes ``iterations`` and ``seed``
    reads_range: bool = False  # takes the client data's range as its ``data_range`` option
    takes_loss: bool = False  # takes the client's loss (label_smoothing, class_weights, focal_gamma)

    def range_option(self, data_range: tuple[float, float] | None) -> dict[str, tuple[float, float]]:
        """``{"data_range": data_range}`` for an attack that reads the data's range (and a range is known), else
        ``{}``: what a caller that knows the data hands every attack alike."""
        return {"data_range": tuple(data_range)} if self.reads_range and data_range is not None else {}

    @property
    def spec(self) -> AttackSpec:
        """What the attack says about itself, as :mod:`fedleak.attacks.catalog` records it."""
        return AttackSpec(self.update_kinds, self.description, self.needs_relu_network, self.takes_defense,
                          self.optimises, self.reads_range, self.takes_loss)


_ATTACKS: LazyRegistry[AttackInfo, AttackSpec] = LazyRegistry("attack", ATTACK_CATALOG, describe=lambda a: a.spec)


def register_attack(
    name: str, *, update_kinds: tuple[str, ...] = ("gradient",), description: str = "",
    needs_relu_network: bool = False, takes_defense: bool = False, optimises: bool = False,
    reads_range: bool = False, takes_loss: bool = False,
) -> Callable[[AttackFn], AttackFn]:
    """Decorator that registers ``fn`` under ``name``."""

    def make(fn: AttackFn) -> AttackInfo:
        return AttackInfo(name, fn, tuple(update_kinds), description or (fn.__doc__ or "").strip().split("\n")[0],
                          needs_relu_network=needs_relu_network, takes_defense=takes_defense, optimises=optimises,
                          reads_range=reads_range, takes_loss=takes_loss)

    return _ATTACKS.decorator(name, make)


def get_attack(name: str) -> AttackInfo:
    """The attack registered as ``name`` (its module imported on first use); :class:`~fedleak.errors.FedleakError`
    listing the others if none is."""
    return _ATTACKS.get(name)


def available_attacks() -> dict[str, AttackInfo]:
    """Every attack, built-in and plug-in, by name (imports every built-in attack, and so torch)."""
    return dict(_ATTACKS.items())


def attack_specs() -> dict[str, AttackSpec]:
    """Every attack's update kinds and description by name, without importing any attack (or torch)."""
    return dict(_ATTACKS.descriptions())


def check_takes_loss(attack: str, loss: str) -> None:
    """Refuse the attack ``attack`` for clients that train with ``loss`` (in words) where its registry entry reads
    only a plain cross-entropy's update (``takes_loss`` False), naming those that take a client's loss."""
    spec = attack_specs().get(attack)
    if spec is not None and not spec.takes_loss:
        taking = sorted(name for name, s in attack_specs().items() if s.takes_loss)
        raise FedleakError(f"the attack '{attack}' reads a plain cross-entropy's update, not the clients' {loss}: "
                           f"use one that takes the client's loss ({', '.join(taking)})")
