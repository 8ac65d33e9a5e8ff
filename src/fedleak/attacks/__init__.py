"""Attacks, looked up by name in a registry (see :func:`fedleak.reconstruct`).

Importing this package imports no attack (and no torch): the built-in attacks are listed in
:mod:`fedleak.attacks.catalog` and each is imported when first looked up (:func:`get_attack`,
:func:`available_attacks`). ``ExclusivityOptions`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedleak.attacks.catalog import AttackSpec
from fedleak.attacks.registry import AttackInfo, attack_specs, available_attacks, get_attack, register_attack
from fedleak.lazy import lazy_attributes

if TYPE_CHECKING:
    from fedleak.attacks.exact import ExclusivityOptions

__all__ = ["AttackInfo", "AttackSpec", "ExclusivityOptions", "attack_specs", "available_attacks", "get_attack",
           "register_attack"]

_LAZY = {"ExclusivityOptions": "fedleak.attacks.exact"}


__getattr__ = lazy_attributes("fedleak.attacks", _LAZY, globals())
