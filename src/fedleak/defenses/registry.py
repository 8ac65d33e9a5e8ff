"""The defense registry: defense classes by name, the built-ins listed in :mod:`fedleak.defenses.catalog`.

Listing defenses (:func:`available_defenses`, :func:`defense_names`) imports no defense module and no torch;
looking one up (:func:`defense_class`) imports the module that registers it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from fedleak.defenses.catalog import DEFENSE_CATALOG, DefenseSpec
from fedleak.errors import OptionError
from fedleak.registry import LazyRegistry


def _describe(cls: Any) -> DefenseSpec:
    return DefenseSpec(cls.stage.value, cls.summary, cls.source)


DEFENSES: LazyRegistry[type, DefenseSpec] = LazyRegistry("defense", DEFENSE_CATALOG, describe=_describe)

C = TypeVar("C", bound=type)


def register_defense(cls: C) -> C:
    """Class decorator: register a named :class:`~fedleak.defenses.base.Defense` dataclass under its ``name``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and getattr(cls, "name", "")
            and hasattr(cls, "stage")):
        raise TypeError(f"{cls!r} is not a named Defense dataclass")
    DEFENSES.register(cls.name, cls)
    return cls


def defense_class(name: str) -> type:
    """The class registered under ``name`` (an OptionError listing the names otherwise)."""
    return DEFENSES.get(name, error=OptionError)


def defense_classes() -> list[type]:
    """Every defense class (imports every built-in defense module), in catalog order, then plug-ins."""
    return [cls for _, cls in DEFENSES.items()]


def available_defenses() -> dict[str, str]:
    """``{name: "stage: summary (source)"}`` of every defense, without importing any."""
    return {name: spec.text for name, spec in DEFENSES.descriptions()}


def defense_names() -> list[str]:
    return DEFENSES.names()
