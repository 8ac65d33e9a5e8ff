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

:class:`LazyRegistry` adds a catalog: the built-in entries' names, descriptions and implementing modules, known
without importing those modules (torch and the rest), so ``fedleak info`` and ``--help`` stay fast; an entry's
module is imported when the entry is first looked up.

This module imports nothing from the rest of fedleak except :mod:`fedleak.errors`, so any module may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fedleak.errors import FedleakError

T = TypeVar("T")
F = TypeVar("F")
M = TypeVar("M")


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


@dataclass(frozen=True)
class CatalogEntry(Generic[M]):
    """What a :class:`LazyRegistry` knows about one entry before the module that implements it is imported.

    ``module`` is the module whose import registers ``name``; ``about`` is what listings show (a description,
    or a record of the entry's properties) and must equal what the registered value says about itself.
    """

    name: str
    module: str
    about: M


class LazyRegistry(Registry[T], Generic[T, M]):
    """A :class:`Registry` whose built-in entries are listed in a catalog, so naming and describing them imports
    nothing; looking one up imports the module that implements it, and that module registers it as usual.

    ``describe(value)`` is what a registered value says about itself; for a catalog name it must equal the
    catalog's ``about`` (else :class:`RuntimeError` at registration: the catalog and the code disagree).
    Names outside the catalog (plug-ins) register and list as in a plain :class:`Registry`.

    Example::

        CATALOG = (CatalogEntry("fast", "mypkg.solvers.fast", "a quick solver"),)
        SOLVERS: LazyRegistry[Solver, str] = LazyRegistry("solver", CATALOG, describe=lambda s: s.description)
        SOLVERS.descriptions()  # [("fast", "a quick solver")]; mypkg.solvers.fast is not imported
        SOLVERS.get("fast")     # imports mypkg.solvers.fast, which registers "fast"
    """

    def __init__(self, kind: str, catalog: Iterable[CatalogEntry[M]], describe: Callable[[T], M]) -> None:
        super().__init__(kind)
        self._catalog: dict[str, CatalogEntry[M]] = {}
        for entry in catalog:
            if entry.name in self._catalog:
                raise RuntimeError(f"{kind} '{entry.name}' is in the catalog twice")
            self._catalog[entry.name] = entry
        self._describe = describe

    def register(self, name: str, value: T) -> T:
        """As :meth:`Registry.register`; a catalog name must be described by ``value`` as the catalog says.

        Registering a catalog name from outside its module imports that module first, so the clash is reported
        as a second registration, as in a plain :class:`Registry`.
        """
        entry = self._catalog.get(name)
        if entry is not None:
            importlib.import_module(entry.module)  # a no-op while that module registers its own entries
            if name not in self._entries and self._describe(value) != entry.about:
                raise RuntimeError(f"{self.kind} '{name}' does not match its catalog entry: the catalog says "
                                   f"{entry.about!r}, the code registers {self._describe(value)!r}; "
                                   "make the two agree")
        return super().register(name, value)

    def _load(self, name: str) -> None:
        entry = self._catalog.get(name)
        if entry is None or name in self._entries:
            return
        importlib.import_module(entry.module)
        if name not in self._entries:
            raise RuntimeError(f"the catalog says importing {entry.module} registers {self.kind} '{name}', "
                               "but it did not")

    def get(self, name: str, error: type[FedleakError] = FedleakError) -> T:
        """The value under ``name``, importing its module first if it is a catalog entry not yet loaded."""
        if name in self:
            self._load(name)
        return super().get(name, error)

    def load_all(self) -> None:
        """Import the module of every catalog entry (what :meth:`items` does before listing values)."""
        for name in self._catalog:
            self._load(name)

    def catalog(self) -> list[CatalogEntry[M]]:
        """The catalog entries, in catalog order (imports nothing)."""
        return list(self._catalog.values())

    def descriptions(self) -> list[tuple[str, M]]:
        """``(name, about)`` of every entry without importing anything: the catalog's, then plug-ins'."""
        extra = [(name, self._describe(value)) for name, value in super().items() if name not in self._catalog]
        return [(entry.name, entry.about) for entry in self._catalog.values()] + extra

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._catalog or name in self._entries
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._catalog.keys() | self._entries.keys())

    def __iter__(self) -> Iterator[str]:
        """Catalog names in catalog order, then plug-ins in registration order."""
        return iter([name for name, _ in self.descriptions()])

    def names(self) -> list[str]:
        return sorted(self._catalog.keys() | self._entries.keys())

    def items(self) -> list[tuple[str, T]]:
        """``(name, value)`` of every entry (imports every catalog module), in the order of :meth:`__iter__`."""
        self.load_all()
        return [(name, self._entries[name]) for name in self]
