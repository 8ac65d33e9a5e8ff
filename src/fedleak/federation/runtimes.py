"""Where a federation runs: Flower's runtimes, in a registry (``FederationSettings.runtime``, ``--runtime``).

Each entry names the function that runs a :class:`~fedleak.federation.settings.FederationSettings` there and
returns its :class:`~fedleak.federation.results.FederationResult`; the function's module is imported only when the
runtime is used (Flower is an optional extra).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from fedleak.errors import OptionError
from fedleak.registry import Registry


@dataclass(frozen=True)
class Runtime:
    name: str
    description: str
    target: str  # "module:function"

    def runner(self) -> Callable:
        module, _, function = self.target.partition(":")
        return getattr(import_module(module), function)


_RUNTIMES: Registry[Runtime] = Registry("runtime")


def register_runtime(runtime: Runtime) -> Runtime:
    return _RUNTIMES.register(runtime.name, runtime)


def get_runtime(name: str) -> Runtime:
    """The runtime ``name``; OptionError listing the runtimes for an unknown one."""
    return _RUNTIMES.get(name, error=OptionError)


def available_runtimes() -> dict[str, str]:
    return {n: r.description for n, r in _RUNTIMES.items()}


register_runtime(Runtime("simulation", "Flower's simulation engine (Ray) in this process",
                         "fedleak.federation.run:run_federation"))
register_runtime(Runtime("deployment", "Flower's deployment runtime: a SuperLink and one SuperNode per client as "
                         "separate processes on this machine's loopback, each node with its own data folder",
                         "fedleak.federation.deployment:run_deployment"))
