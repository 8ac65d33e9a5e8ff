"""What the server knows of a client's local training: the facts it declares (its run configuration, or what
the client reports in its metrics and update files), checked, and the local steps they imply.

The keys are :data:`DECLARED_KEYS`: ``local_steps``, or ``local_epochs`` and ``batch_size`` (steps are then epochs
x ``ceil(num_examples / batch_size)``); ``clip_norm`` and ``noise_multiplier`` for DP clients; ``learning_rate``,
the rate the server sets its clients (a one-step change is then read at the gradient's own scale).
:func:`fedleak.update_kind.describe_update` reads an update with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedleak.errors import UpdateError
from fedleak.validation import check_float, check_int


def _count(name: str, value: Any) -> int:
    return check_int(name, _number(name, value, int), low=1, error=UpdateError)


def _real(name: str, value: Any) -> float:
    return check_float(name, _number(name, value, float), low=0.0, error=UpdateError)


def _rate(name: str, value: Any) -> float:
    from fedleak.updates import check_learning_rate  # (torch: imported where a rate is declared)

    return check_learning_rate(_number(name, value, float))


#: each declared fact's check: a count (at least 1), a real number (0 or more), a learning rate (above 0)
CHECKS = {"local_steps": _count, "local_epochs": _count, "batch_size": _count, "clip_norm": _real,
          "noise_multiplier": _real, "learning_rate": _rate}
DECLARED_KEYS = tuple(CHECKS)


def check_declared(declared: Mapping[str, Any] | None) -> dict[str, Any]:
    """Declared facts (keys :data:`DECLARED_KEYS`; ``None`` values dropped) as checked numbers; numbers
    written as text (file metadata, Flower configs) are read. :class:`~fedleak.errors.UpdateError` names a
    bad key or value."""
    facts = {k: v for k, v in (declared or {}).items() if v is not None}
    unknown = sorted(set(facts) - set(DECLARED_KEYS))
    if unknown:
        raise UpdateError(f"unknown declared fact(s) {unknown}; use {', '.join(DECLARED_KEYS)}")
    return {key: CHECKS[key](f"declared {key}", value) for key, value in facts.items()}


def declared_facts(update: Any, declared: Mapping[str, Any] | None) -> dict[str, Any]:
    """Declared facts: the update's own ``local_steps`` and metadata, overridden by ``declared``."""
    meta = getattr(update, "metadata", None) or {}
    facts = {k: meta[k] for k in DECLARED_KEYS if k in meta}
    if getattr(update, "local_steps", None) is not None:
        facts["local_steps"] = update.local_steps
    return check_declared({**facts, **(declared or {})})


def _number(name: str, value: Any, kind: type) -> Any:
    """A declared number as given, or read from text (file metadata and Flower configs carry strings)."""
    if isinstance(value, float) and kind is int and value.is_integer():
        return int(value)  # Flower metrics may carry whole numbers as floats
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        raise UpdateError(f"{name} must be a number, got {value!r}") from None


def counted_steps(update: Any) -> tuple[int | None, str | None]:
    """Local steps read off a weight update's BatchNorm counters (``num_batches_tracked`` moves by one per
    training-mode forward pass, so by one per local step), when they all moved alike (with why)."""
    names = [k for k, v in update.before.items() if k.endswith("num_batches_tracked") and not v.is_floating_point()]
    moved = {int(update.after[k].sum() - update.before[k].sum()) for k in names}
    if len(moved) != 1 or min(moved) < 1:
        return None, None
    steps = moved.pop()
    return steps, (f"the BatchNorm counter '{names[0]}' moved by {steps}: {steps} local step(s) (one per training-mode "
                   "forward pass)")


def local_steps(update: Any, facts: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """Local steps: declared, or counted by the update's BatchNorm counters, or epochs x batches per epoch, or at
    least ``ceil(n / batch)`` (with why)."""
    if "local_steps" in facts:
        return facts["local_steps"], f"the client declares {facts['local_steps']} local step(s)"
    counted = counted_steps(update)
    if counted[0] is not None:
        return counted
    num_examples = update.num_examples
    batch = facts.get("batch_size")
    if batch is None or num_examples is None:
        return None, None
    per_epoch = math.ceil(num_examples / batch)
    if "local_epochs" in facts:
        steps = facts["local_epochs"] * per_epoch
        return steps, (f"{facts['local_epochs']} declared local epoch(s) over {num_examples} examples in batches of "
                       f"{batch}: {steps} step(s)")
    if per_epoch > 1:
        return per_epoch, (f"{num_examples} examples and a declared batch size of {batch}: at least {per_epoch} "
                           "steps if every example was used")
    return None, None
