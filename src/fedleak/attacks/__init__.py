"""Attacks, looked up by name in a registry (see :func:`fedleak.reconstruct`)."""

from fedleak.attacks import exact as _exact  # noqa: F401  (registers exclusivity, alias conv-exclusivity)
from fedleak.attacks import malicious as _malicious  # noqa: F401  (registers trap-weights, imprint)
from fedleak.attacks.exact import ExclusivityOptions
from fedleak.attacks.registry import AttackInfo, available_attacks, get_attack, register_attack

__all__ = ["AttackInfo", "ExclusivityOptions", "available_attacks", "get_attack", "register_attack"]

# weight-update leakage and optimisation baselines (issue 4): importing registers the attacks
from fedleak.attacks import auto as _auto  # noqa: E402,F401
from fedleak.attacks import dlm as _dlm  # noqa: E402,F401
from fedleak.attacks import inversion as _inversion  # noqa: E402,F401  (dlg, idlg, ig)
