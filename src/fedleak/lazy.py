"""Package attributes imported on first use (PEP 562), so that importing a package stays cheap (no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping


def lazy_attributes(package: str, table: Mapping[str, str], namespace: MutableMapping[str, object],
                    before: Callable[[str], None] | None = None, *,
                    submodules: bool = False) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``table`` maps each public name to the module that defines it.
    With ``submodules``, a name that is the module's own (``"metrics": "fedleak.metrics"``) is that module;
    otherwise it is always the module's attribute of that name. The value is cached in ``namespace`` (the
    package's ``globals()``). ``before(module)`` runs before a module is imported."""

    def __getattr__(name: str) -> object:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        if before is not None:
            before(module)
        loaded = importlib.import_module(module)
        value = loaded if submodules and module == f"{package}.{name}" else getattr(loaded, name)
        namespace[name] = value
        return value

    return __getattr__
