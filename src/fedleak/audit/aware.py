"""Run an attack with the client's defenses when it can use them (a defense-aware attack).

An attack that takes a ``defense`` option (the exclusivity attack and the optimisation attacks: the ROG insight
that an obfuscation the attacker knows is part of its forward model) is given the client's
:class:`~fedleak.defenses.DefenseStack`; one without that option runs on the update as it is. Audits and the
federation's server record which of the two happened.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.reconstruction import Reconstruction

_UNKNOWN = re.compile(r"unknown[^\[]*\[([^\]]*)\]")


def refuses_defense_option(error: FedleakError) -> bool:
    """Whether ``error`` is an attack refusing the option ``defense`` as unknown (its options dataclass lists the
    unknown names in brackets: ``unknown option(s): ['defense']; known: [...]``)."""
    found = _UNKNOWN.search(str(error))
    return found is not None and "'defense'" in found.group(1)


def reconstruct_aware(model: nn.Module, update: Any, *, attack: str, defense: DefenseStack | None,
                      **options: Any) -> tuple[Reconstruction, bool | None]:
    """``(reconstruction, aware)``: :func:`fedleak.reconstruct` with ``defense=defense`` when the attack takes that
    option (``aware`` True), else without it (False); None when there is no defense."""
    from fedleak.api import reconstruct

    if not defense:
        return reconstruct(model, update, attack=attack, **options), None
    try:
        return reconstruct(model, update, attack=attack, defense=defense, **options), True
    except FedleakError as exc:
        if not refuses_defense_option(exc):
            raise
    return reconstruct(model, update, attack=attack, **options), False
