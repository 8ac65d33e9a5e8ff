"""A lossless JSON form of a :class:`~fedleak.federation.results.FederationResult`, for handing it between processes.

On the deployment runtime the ServerApp runs in a process Flower starts (``flwr-serverapp``), not in the one that
called :func:`~fedleak.federation.deployment.run_deployment`; it writes its result with :func:`dump_result` to a
file that process named, which reads it back with :func:`load_result`. Unlike ``results.json`` (a report for
people: flattened, NaN as null) this form keeps every field of every typed record, so the reader gets the very
objects the server built and writes the usual ``results.json`` and ``report.html`` from them. It is generic over
frozen dataclasses (fields typed with dataclasses, tuples, dicts, unions with None, numpy arrays and plain
values), so records the results gain later travel too. It is JSON, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from functools import lru_cache
from typing import Any

import numpy as np

from fedleak.errors import FedleakError
from fedleak.federation.results import FederationResult

FORMAT = "fedleak-federation-result"


def encode(obj: Any) -> Any:
    """``obj`` as plain JSON values (dataclasses as dicts of their fields, arrays as nested lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _find_class(name: str) -> type | None:
    """A class called ``name`` in a loaded fedleak module (a type only imported for type checking)."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fedleak.") and isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    return None


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s field types; names its module imports for type checking only are looked up in loaded fedleak
    modules, and a field whose type still cannot be resolved is decoded as plain JSON values."""
    names: dict[str, Any] = {}
    while True:
        try:
            return typing.get_type_hints(cls, localns=names)
        except NameError as exc:
            found = _find_class(exc.name) if exc.name and exc.name not in names else None
            if found is None:
                break
            names[exc.name] = found
    module = vars(sys.modules[cls.__module__])
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        try:
            out[f.name] = eval(f.type, module, names) if isinstance(f.type, str) else f.type  # noqa: S307
        except NameError:
            out[f.name] = Any
    return out


def decode(tp: Any, value: Any) -> Any:
    """The object of type ``tp`` that :func:`encode` turned into ``value``."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict) and "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return decode(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return tp(**{f.name: decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        return tuple(decode(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if tp is np.ndarray or (isinstance(value, dict) and "__ndarray__" in value):
        return np.asarray(value["__ndarray__"], dtype=value["dtype"])
    if origin is dict or tp is dict:
        return dict(value)
    return value


def dump_result(result: FederationResult) -> str:
    """``result`` as JSON text (NaN and infinities kept)."""
    return json.dumps({"format": FORMAT, "result": encode(result)})


def load_result(text: str) -> FederationResult:
    """The :class:`FederationResult` of :func:`dump_result`'s text; FedleakError when it is not one."""
    try:
        payload = json.loads(text)
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}")
        return decode(FederationResult, payload["result"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedleakError(f"the server's result cannot be read: {exc}") from None
