"""Attacks, looked up by name in a registry (see :func:`fedleak.reconstruct`)."""

from fedleak.attacks import exclusivity as _exclusivity  # noqa: F401  (registers the attack)
from fedleak.attacks import malicious as _malicious  # noqa: F401  (registers trap-weights, imprint)
from fedleak.attacks.exclusivity import ExclusivityOptions
from fedleak.attacks.registry import AttackInfo, available_attacks, get_attack, register_attack

__all__ = ["AttackInfo", "ExclusivityOptions", "available_attacks", "get_attack", "register_attack"]

# weight-update leakage and optimisation baselines (issue 4): importing registers the attacks
from fedleak.attacks import auto as _auto  # noqa: E402,F401
from fedleak.attacks import dlm as _dlm  # noqa: E402,F401
from fedleak.attacks import optimization as _optimization  # noqa: E402,F401
from fedleak.attacks import conv_exclusivity as _conv_exclusivity  # noqa: E402,F401  (CNNs, issue 6)
