"""Attacks, looked up by name in a registry (see :func:`fedleak.reconstruct`).

Importing this package imports no attack (and no torch): the built-in attacks are listed in
:mod:`fedleak.attacks.catalog` and each is imported when first looked up (:func:`get_attack`,
:func:`available_attacks`). ``ExclusivityOptions`` and the label inference from a sparse update's indices
(:mod:`fedleak.attacks.index_labels`) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedleak.attacks.catalog import AttackSpec
from fedleak.attacks.registry import AttackInfo, attack_specs, available_attacks, get_attack, register_attack
from fedleak.lazy import lazy_attributes

if TYPE_CHECKING:
    from fedleak.attacks.exact import ExclusivityOptions
    from fedleak.attacks.index_labels import (
        build_index_profile,
        infer_labels_from_indices,
        score_label_inference,
    )

__all__ = ["AttackInfo", "AttackSpec", "ExclusivityOptions", "attack_specs", "available_attacks",
           "build_index_profile", "get_attack", "infer_labels_from_indices", "register_attack",
           "score_label_inference"]

_LAZY = {"ExclusivityOptions": "fedleak.attacks.exact",
         **{name: "fedleak.attacks.index_labels" for name in ("build_index_profile", "infer_labels_from_indices",
                                                               "score_label_inference")}}


__getattr__ = lazy_attributes("fedleak.attacks", _LAZY, globals())
