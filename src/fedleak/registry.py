"""One generic name -> value registry, used by every pluggable part of fedleak.

Attacks, data sets, file formats, LP solvers, threat models, defenses and audit scenarios are each looked up
by name in a :class:`Registry`, never dispatched with if/elif chains. All registries behave the same way:

* a name can be registered once; registering it again raises :class:`RuntimeError` (two plug-ins claiming one
  name is a programming error, not bad user input);
* looking up an unknown name raises a :class:`~fedleak.errors.FedleakError` (or the subclass the caller picks)
  that lists the names available, so a typo on the command line gets a one-line answer;
* entries keep their registration order (:meth:`Registry.items`), which is the order some registries try
  them in (file formats); :meth:`Registry.names` is sorted, for messages and listings.

Example::

    from fedleak.registry import Registry

    CONVERTERS: Registry[Converter] = Registry("layer converter")
    CONVERTERS.register("linear", convert_linear)

    @CONVERTERS.decorator("conv2d")
    def convert_conv2d(layer): ...

    CONVERTERS.get("linear", error=ModelError)  # unknown: ModelError("unknown layer converter 'x'; available: ...")

This module imports nothing from the rest of fedleak except :mod:`fedleak.errors`, so any module may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedleak.errors import FedleakError

T = TypeVar("T")
F = TypeVar("F")


class Registry(Generic[T]):
    """Values of type ``T`` by name; ``kind`` (``"attack"``, ``"data set"``) names them in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name`` and return it; a name already taken raises :class:`RuntimeError`."""
        if name in self._entries:
            raise RuntimeError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = value
        return value

    def unregister(self, name: str) -> T:
        """Remove and return the value under ``name`` (for plug-ins and tests that register temporarily)."""
        return self._entries.pop(name)

    def decorator(self, name: str, make: Callable[[Any], T] | None = None) -> Callable[[F], F]:
        """``@registry.decorator(name)``: register the decorated object (or ``make(obj)``), return it unchanged.

        ``make`` builds the registered value from the decorated function, e.g. a record holding the function
        and its description; without it the function itself is registered.
        """

        def register(obj: F) -> F:
            self.register(name, make(obj) if make is not None else obj)  # type: ignore[arg-type]
            return obj

        return register

    def get(self, name: str, error: type[FedleakError] = FedleakError) -> T:
        """The value registered under ``name``; else ``error("unknown <kind> '<name>'; available: a, b")``."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name" from a config file
            raise error(f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        """Names in registration order."""
        return iter(list(self._entries))

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, value)`` pairs in registration order (a copy: registering meanwhile is safe)."""
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()!r})"
