"""Named options as one string, ``"name"`` or ``"name:key=value,key=value"`` (a defense, a membership attack), and
back: each value converted to the type its dataclass field declares, and the label of an instance (its name and the
options that differ from their defaults)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

from fedleak.errors import OptionError
from fedleak.validation import describe


def parse_spec(spec: str, what: str, cls_of: Callable[[str], type]) -> tuple[str, dict[str, object]]:
    """``spec``'s name and its options, typed by the fields of ``cls_of(name)`` (a dataclass; an OptionError that
    names ``what`` for a malformed item, an unknown option or a value of the wrong type)."""
    if not isinstance(spec, str) or not spec.strip():
        raise OptionError(f"a {what} is given as 'name' or 'name:key=value,...', got {describe(spec)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    types_ = {f.name: f.type for f in dataclasses.fields(cls_of(name)) if f.init}
    params: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise OptionError(f"{what} '{name}': '{item}' is not key=value")
        if key not in types_:
            raise OptionError(f"{what} '{name}' has no parameter '{key}'; its parameters: {sorted(types_)}")
        params[key] = _convert(f"{what} '{name}'", key, text.strip(), types_[key])
    return name, params


def spec_label(name: str, owner: object) -> str:
    """``name(key=value, ...)`` with the init fields of the dataclass ``owner`` that differ from their defaults."""
    changed = [f"{f.name}={_text(getattr(owner, f.name))}" for f in dataclasses.fields(owner)  # type: ignore[arg-type]
               if f.init and (f.default is dataclasses.MISSING or getattr(owner, f.name) != f.default)]
    return f"{name}({', '.join(changed)})" if changed else name


def _text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _convert(owner: str, key: str, text: str, annotation: object) -> object:
    kinds = _kinds(annotation)
    if text.lower() == "none" and type(None) in kinds:
        return None
    for kind in (bool, int, float, str):
        if kind not in kinds:
            continue
        if kind is bool:
            if text.lower() in ("true", "false", "1", "0", "yes", "no"):
                return text.lower() in ("true", "1", "yes")
            continue
        try:
            return kind(text)
        except ValueError:
            continue
    raise OptionError(f"{owner}: parameter {key} cannot be {text!r}")


def _kinds(annotation: object) -> set[object]:
    if isinstance(annotation, str):
        names = {p.strip() for p in annotation.split("|")}
        table = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
        return {table[n] for n in names if n in table}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}
