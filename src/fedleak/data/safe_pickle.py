"""A restricted unpickler for data pickles (CIFAR python batches): numpy arrays, dicts, lists, bytes, nothing else.

``pickle.load`` runs whatever callable a pickle names, so fedleak never uses it on a user's files. This
unpickler resolves only the few globals numpy needs to rebuild an array (and Python 3's protocol-2 encoding of
bytes, empty bytes included); any other global stops loading with :class:`~fedleak.errors.DataError` before
anything is called.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from fedleak.errors import DataError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1"}


def _latin1_encode(obj: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocol <= 2: latin-1 text -> bytes only."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1 or errors != "strict":
        raise DataError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r}) in a pickle")
    return obj.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as Python 3 uses it to pickle ``b""`` at protocol <= 2; any argument is refused (no ``bytes(n)``)."""
    if args:
        raise DataError(f"refusing bytes() with {len(args)} argument(s) in a pickle")
    return b""


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    found: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    for package in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spell the module differently
        found[(f"{package}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        found[(f"{package}.multiarray", "scalar")] = _multiarray.scalar
        found[(f"{package}.numeric", "_frombuffer")] = _numeric._frombuffer
    return found


ALLOWED_GLOBALS = _numpy_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose :meth:`find_class` only returns the objects in :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: the pickle asks for '{module}.{name}'; fedleak only rebuilds numpy arrays, "
                "lists, dicts and bytes from pickles and refuses anything else (nothing was executed)"
            ) from None


def load_restricted(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; corrupt or disallowed content raises DataError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return RestrictedUnpickler(io.BytesIO(raw), str(path)).load()
    except DataError as exc:
        if str(path) in str(exc):
            raise
        raise DataError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None
