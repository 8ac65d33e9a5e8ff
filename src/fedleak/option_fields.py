"""Options dataclasses: one built from keyword arguments, refusing names that are not its fields
(:func:`options_from`), and its ``int``, ``float`` and ``bool`` fields checked against their annotations
(:func:`validate_fields`, meant for ``__post_init__``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

import numpy as np

from fedleak.errors import OptionError
from fedleak.validation import ErrorType, check_float, check_int, describe

_SCALARS: dict[str, type] = {"int": int, "float": float, "bool": bool}

OptionsT = typing.TypeVar("OptionsT")


def options_from(cls: type[OptionsT], kwargs: Mapping[str, object], *, error: ErrorType = OptionError,
                 what: str = "option", defaults: OptionsT | None = None) -> OptionsT:
    """The options dataclass ``cls`` built from keyword arguments, refusing names that are not its fields.

    An unknown name raises ``error("unknown <what>(s): ['x']; known: ['a', 'b', ...]")`` before anything is
    built, so a typo is never silently ignored; the values themselves are checked by ``cls`` (its
    ``__post_init__``, e.g. with :func:`validate_fields`). ``what`` names the options in that message
    (``"fishing option"``). With ``defaults`` (an instance of ``cls``), names not given keep its values.
    Options classes use this in their ``from_kwargs``::

        @classmethod
        def from_kwargs(cls, **kwargs) -> FishingOptions:
            return options_from(cls, kwargs, error=SolverError, what="fishing option")
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"options_from needs a dataclass type, got {cls!r}")
    known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted((key for key in kwargs if key not in known), key=str)
    if unknown:
        raise error(f"unknown {what}(s): {unknown}; known: {known}")
    if defaults is not None:
        return dataclasses.replace(defaults, **kwargs)  # type: ignore[type-var]
    return cls(**kwargs)


def _scalar_annotation(annotation: object) -> tuple[type | None, bool]:
    """``(int|float|bool, optional)`` for an annotation such as ``float`` or ``"int | None"``; else ``(None, _)``."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
        optional = "None" in parts or annotation.startswith("Optional[")
        kinds = [p for p in parts if p != "None"]
        return (_SCALARS.get(kinds[0]) if len(kinds) == 1 else None), optional
    if annotation in (int, float, bool):
        return annotation, False  # type: ignore[return-value]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in (int, float, bool):
            return kinds[0], type(None) in args
    return None, False


def validate_fields(obj: object, *, error: ErrorType = OptionError) -> None:
    """Check a dataclass's ``int``, ``float`` and ``bool`` fields against their annotations.

    ``float`` fields take finite real numbers, ``int`` fields whole numbers, both ``>= 0`` unless the field's
    metadata says otherwise (``field(metadata={"low": -1.0, "high": 1.0, "finite": False})``); ``bool`` fields
    take ``True`` or ``False``; ``X | None`` fields also take ``None``. Strings are refused everywhere. Other
    fields are left alone. Meant for ``__post_init__``; raises ``error`` (:class:`OptionError` unless the
    options' own module has a more specific one) naming the option.
    """
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"validate_fields needs a dataclass instance, got {type(obj).__name__}")
    owner = type(obj).__name__
    for field in dataclasses.fields(obj):
        kind, optional = _scalar_annotation(field.type)
        value = getattr(obj, field.name)
        if kind is None or (optional and value is None):
            continue
        name = f"option {field.name} (of {owner})"
        if kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise error(f"{name} must be True or False, got {describe(value)}")
            continue
        low, high = field.metadata.get("low", 0), field.metadata.get("high")
        if kind is int:
            check_int(name, value, low=low, high=high, error=error)
        else:
            check_float(name, value, low=low, high=high, finite=field.metadata.get("finite", True), error=error)
