"""The exclusivity attack: one pipeline for MLPs and CNNs (see :mod:`fedleak.attacks.exact.pipeline`).

* :mod:`~fedleak.attacks.exact.options` -- :class:`ExclusivityOptions`.
* :mod:`~fedleak.attacks.exact.state` -- :class:`HeadAttack`, the state on one update.
* :mod:`~fedleak.attacks.exact.grouping` -- gradient rows grouped by the input they imply.
* :mod:`~fedleak.attacks.exact.candidates` -- the head's top layer: candidates from the groups, scale fitting.
* :mod:`~fedleak.attacks.exact.walkdown` -- the head's hidden layers.
* :mod:`~fedleak.attacks.exact.conv_walkdown` -- the conv blocks: invert_block, invert_chain, feature matching.
* :mod:`~fedleak.attacks.exact.settle` -- candidates ruled out by the scale the top layer's check read.
* :mod:`~fedleak.attacks.exact.witnesses`, :mod:`~fedleak.attacks.exact.certificate`,
  :mod:`~fedleak.attacks.exact.joint` -- the certificate.
* :mod:`~fedleak.attacks.exact.attack` -- the registered attack and its entry points.
"""

from fedleak.attacks.exact.attack import conv_exclusivity_attack, exclusivity_attack, exclusivity_on_weights
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.state import HeadAttack

_CONV = ("EPS32", "BlockSolve", "ChainSolve", "invert_block", "invert_chain")


def __getattr__(name: str):
    """The conv walk-down's names, imported on first use (it loads scipy: 0.3 s an MLP attack need not pay)."""
    if name in _CONV:
        from fedleak.attacks.exact import conv_walkdown

        return getattr(conv_walkdown, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ExclusivityOptions", "HeadAttack", "exclusivity_attack", "conv_exclusivity_attack",
           "exclusivity_on_weights", "invert_block", "invert_chain", "BlockSolve", "ChainSolve", "EPS32"]
