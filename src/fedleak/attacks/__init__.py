"""Attacks, looked up by name in a registry (see :func:`fedleak.reconstruct`)."""

from fedleak.attacks import exclusivity as _exclusivity  # noqa: F401  (registers the attack)
from fedleak.attacks.exclusivity import ExclusivityOptions
from fedleak.attacks.registry import AttackInfo, available_attacks, get_attack, register_attack

__all__ = ["AttackInfo", "ExclusivityOptions", "available_attacks", "get_attack", "register_attack"]
