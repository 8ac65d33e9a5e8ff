"""The defenses a federation realises with Flower's own machinery, and how: one registry keyed by defense name.

Every other defense runs inside the client's local round (:func:`fedleak.clients.defended.defended_local_round`).
A defense registered here instead runs as Flower runs it: a client mod on the ClientApp (``client_mod``), a
wrapper around the server's strategy (``server_wrapper``), or both; ``upload_weights`` says that its mod needs
the client's new weights in the reply (Flower's DP mods clip ``reply - sent``, which is meaningless on an
uploaded change). Outside a federation the same defenses run through their own ``apply``
(:mod:`fedleak.defenses.flower_dp` calls the same Flower functions).

Flower-native defenses act on the reply after the client's local round, so in a stack they must come after
every other update filter (:func:`check_native_order`, run when the settings are built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedleak.defenses.base import Defense, UpdateFilter
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import OptionError
from fedleak.registry import Registry

if TYPE_CHECKING:
    from fedleak.federation.settings import FederationSettings

ClientMod = Callable[..., Any]  # Flower's mod signature: mod(msg, context, call_next) -> Message


@dataclass(frozen=True)
class FlowerNative:
    """How a federation realises the defense ``name`` in Flower (see the module docstring)."""

    name: str
    how: str
    client_mod: Callable[[Defense], ClientMod] | None = None
    server_wrapper: Callable[[Defense, Any, FederationSettings], Any] | None = None
    upload_weights: bool = True


_NATIVE: Registry[FlowerNative] = Registry("Flower-native defense")


def register_flower_native(native: FlowerNative) -> FlowerNative:
    return _NATIVE.register(native.name, native)


def flower_native(defense: Defense) -> FlowerNative | None:
    """How Flower realises ``defense``, or None when the client's local round runs it."""
    return _NATIVE.get(defense.name) if defense.name in _NATIVE else None


def native_defenses(stack: DefenseStack) -> tuple[Defense, ...]:
    return tuple(d for d in stack.defenses if flower_native(d) is not None)


def client_side(stack: DefenseStack) -> DefenseStack:
    """The part of ``stack`` the client's local round runs (everything Flower does not realise itself)."""
    return DefenseStack(tuple(d for d in stack.defenses if flower_native(d) is None))


def check_native_order(stack: DefenseStack) -> None:
    """OptionError unless every Flower-native defense comes after every other update filter (it acts on the
    reply, after the local round)."""
    seen_native: list[str] = []
    for d in stack.defenses:
        if flower_native(d) is not None:
            seen_native.append(d.name)
        elif seen_native and isinstance(d, UpdateFilter):
            raise OptionError(f"defense '{d.name}' follows {seen_native} in the stack '{stack.label}', but Flower "
                              "applies those to the reply after the client's local round: put them last")


def needs_weight_upload(stack: DefenseStack) -> bool:
    return any(flower_native(d).upload_weights for d in native_defenses(stack))  # type: ignore[union-attr]


def client_mods(stack: DefenseStack) -> list[ClientMod]:
    """The Flower mods of ``stack``, outermost first: the stack's first native defense acts on the reply first,
    so it is the innermost mod."""
    mods = [flower_native(d).client_mod(d) for d in native_defenses(stack)  # type: ignore[union-attr]
            if flower_native(d).client_mod is not None]  # type: ignore[union-attr]
    return list(reversed(mods))


def wrap_strategy(stack: DefenseStack, strategy: Any, settings: FederationSettings) -> Any:
    """``strategy`` inside the server wrappers of ``stack``'s Flower-native defenses (in stack order)."""
    for d in native_defenses(stack):
        wrapper = flower_native(d).server_wrapper  # type: ignore[union-attr]
        if wrapper is not None:
            strategy = wrapper(d, strategy, settings)
    return strategy


def available_flower_native() -> dict[str, str]:
    return {name: native.how for name, native in _NATIVE.items()}


# ---------------------------------------------------------------------------------------------------------
# Flower's DP (fedleak.defenses.flower_dp)


def _local_dp_mod(defense: Defense) -> ClientMod:
    return defense.flower_mod()  # type: ignore[attr-defined]


def _fixed_clipping_mod(defense: Defense) -> ClientMod:
    from flwr.clientapp.mod import fixedclipping_mod

    return fixedclipping_mod


def _central_dp_wrapper(defense: Defense, strategy: Any, settings: FederationSettings) -> Any:
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=defense.noise_multiplier, clipping_norm=defense.clip,  # type: ignore[attr-defined]
        num_sampled_clients=settings.clients)


register_flower_native(FlowerNative(
    "local-dp", "Flower's LocalDpMod on the ClientApp (clips the reply's change, adds noise)",
    client_mod=_local_dp_mod))
register_flower_native(FlowerNative(
    "central-dp", "Flower's fixedclipping_mod on the ClientApp and DifferentialPrivacyClientSideFixedClipping "
                  "around the server's strategy (noise on the aggregate)",
    client_mod=_fixed_clipping_mod, server_wrapper=_central_dp_wrapper))
