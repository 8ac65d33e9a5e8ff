"""The membership attack registry: attack classes by name, the built-ins listed in
:mod:`fedleak.membership.catalog`. Listing them imports no attack and no torch; looking one up imports its module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fedleak.errors import OptionError
from fedleak.membership.catalog import MEMBERSHIP_CATALOG, MembershipSpec
from fedleak.registry import LazyRegistry


def _describe(cls: Any) -> MembershipSpec:
    return MembershipSpec(cls.summary, cls.source, tuple(sorted(cls.needs)))


MEMBERSHIP_ATTACKS: LazyRegistry[type, MembershipSpec] = LazyRegistry(
    "membership attack", MEMBERSHIP_CATALOG, describe=_describe)

C = TypeVar("C", bound=type)


def register_membership_attack(cls: C) -> C:
    """Class decorator: register a named :class:`~fedleak.membership.base.MembershipAttack` dataclass."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and getattr(cls, "name", "")
            and hasattr(cls, "score")):
        raise TypeError(f"{cls!r} is not a named MembershipAttack dataclass")
    MEMBERSHIP_ATTACKS.register(cls.name, cls)
    return cls


def membership_attack_class(name: str) -> type:
    """The class registered under ``name`` (an OptionError listing the names otherwise)."""
    return MEMBERSHIP_ATTACKS.get(name, error=OptionError)


def membership_attack_names() -> list[str]:
    """Every membership attack's name, sorted, without importing any."""
    return MEMBERSHIP_ATTACKS.names()


def available_membership_attacks() -> dict[str, str]:
    """``{name: "summary (reads ...; source)"}`` of every membership attack, without importing any."""
    return {name: spec.text for name, spec in MEMBERSHIP_ATTACKS.descriptions()}
