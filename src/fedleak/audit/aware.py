"""Run an attack with the client's defenses when it can use them (a defense-aware attack).

An attack that takes a ``defense`` option (the exclusivity attack and the optimisation attacks: the ROG insight
that an obfuscation the attacker knows is part of its forward model) is given the client's
:class:`~fedleak.defenses.DefenseStack` (its registry entry says so: ``AttackInfo.takes_defense``); one without
that option runs on the update as it is. Audits and the federation's server record which of the two happened.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedleak.defenses.stack import DefenseStack
from fedleak.reconstruction import Reconstruction


def reconstruct_aware(model: nn.Module, update: Any, *, attack: str, defense: DefenseStack | None,
                      **options: Any) -> tuple[Reconstruction, bool | None]:
    """``(reconstruction, aware)``: :func:`fedleak.reconstruct` with ``defense=defense`` when the attack takes that
    option (its registry entry says so: ``aware`` True), else without it (False); None when there is no defense."""
    from fedleak.api import reconstruct
    from fedleak.attacks import get_attack

    if not defense:
        return reconstruct(model, update, attack=attack, **options), None
    if get_attack(attack).takes_defense:
        return reconstruct(model, update, attack=attack, defense=defense, **options), True
    return reconstruct(model, update, attack=attack, **options), False
