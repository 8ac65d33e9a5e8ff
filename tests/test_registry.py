"""The generic registry and the options-from-keywords helper every pluggable part uses."""

from dataclasses import dataclass, field

import pytest

from fedleak.errors import DataError, FedleakError, OptionError
from fedleak.option_fields import options_from
from fedleak.registry import Registry


def test_registry_registers_looks_up_and_lists() -> None:
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2
    reg.register("a", 1)
    assert reg.get("a") == 1
    assert "a" in reg and "c" not in reg and ["x"] not in reg
    assert reg.names() == ["a", "b"]
    assert reg.items() == [("b", 2), ("a", 1)]  # registration order
    assert list(reg) == ["b", "a"] and len(reg) == 2


def test_registry_refuses_a_second_registration() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(RuntimeError, match="widget 'a' is registered twice"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_registry_unknown_name_lists_the_available_ones() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("b", 2)
    reg.register("a", 1)
    with pytest.raises(FedleakError, match=r"^unknown widget 'c'; available: a, b$"):
        reg.get("c")
    with pytest.raises(DataError, match="unknown widget"):
        reg.get("c", DataError)
    with pytest.raises(FedleakError, match="unknown widget"):
        reg.get(["not", "hashable"])  # type: ignore[arg-type]


def test_registry_decorator_returns_the_function() -> None:
    reg: Registry[tuple[object, str]] = Registry("widget")

    @reg.decorator("f", make=lambda fn: (fn, "described"))
    def f() -> int:
        return 1

    assert f() == 1 and reg.get("f") == (f, "described")

    @reg.decorator("g")
    def g() -> int:
        return 2

    assert reg.get("g") is g
    with pytest.raises(RuntimeError, match="registered twice"):
        reg.decorator("g")(g)


def test_builtin_registries_refuse_duplicates() -> None:
    from fedleak.attacks import register_attack
    from fedleak.data import register_dataset
    from fedleak.fishing import register_solver

    with pytest.raises(RuntimeError, match="attack 'exclusivity' is registered twice"):
        register_attack("exclusivity")(lambda model, update: None)
    with pytest.raises(RuntimeError, match="data set 'digits' is registered twice"):
        register_dataset("digits", "again")(lambda: None)
    with pytest.raises(RuntimeError, match="LP solver 'highs' is registered twice"):
        register_solver("highs", object, "again")


@dataclass(frozen=True)
class _Options:
    a: int = 1
    b: float = 2.0
    derived: int = field(default=0, init=False)


def test_options_from_builds_and_refuses_unknown_names() -> None:
    assert options_from(_Options, {"a": 3}) == _Options(a=3)
    assert options_from(_Options, {"b": 5.0}, defaults=_Options(a=7)) == _Options(a=7, b=5.0)
    with pytest.raises(OptionError, match=r"unknown widget option\(s\): \['c', 'derived'\]; known: \['a', 'b'\]"):
        options_from(_Options, {"c": 1, "derived": 2, "a": 1}, what="widget option")
    with pytest.raises(DataError, match=r"unknown option\(s\)"):
        options_from(_Options, {"zz": 1}, error=DataError)
    with pytest.raises(TypeError):
        options_from(dict, {})  # type: ignore[arg-type]


# --- the lazy registry: a catalog lists entries without importing them -------------------------------------------


@dataclass(frozen=True)
class _Impl:
    name: str
    description: str


@pytest.fixture
def lazy_home(tmp_path, monkeypatch):
    """A registry in a module of its own, and a factory of implementing modules (real files, really imported)."""
    import sys
    import types

    from fedleak.registry import CatalogEntry, LazyRegistry

    home = types.ModuleType(f"lazyreg_home_{tmp_path.name}")
    monkeypatch.setitem(sys.modules, home.__name__, home)
    monkeypatch.syspath_prepend(str(tmp_path))

    def implementation(module: str, *registrations: tuple[str, str]) -> str:
        lines = [f"import {home.__name__} as home"]
        lines += [f"home.REG.register({name!r}, home.Impl({name!r}, {desc!r}))" for name, desc in registrations]
        (tmp_path / f"{module}.py").write_text("\n".join(lines) + "\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
        return module

    def make(*entries: tuple[str, str, str]):
        home.Impl = _Impl
        home.REG = LazyRegistry("widget", [CatalogEntry(n, m, d) for n, m, d in entries],
                                describe=lambda v: v.description)
        return home.REG

    yield make, implementation
    for module in list(sys.modules):
        if module.startswith(f"lazyreg_impl_{tmp_path.name}"):
            del sys.modules[module]


def test_lazy_registry_lists_without_importing_and_imports_on_lookup(lazy_home, tmp_path) -> None:
    import sys

    make, implementation = lazy_home
    fast = implementation(f"lazyreg_impl_{tmp_path.name}_fast", ("fast", "a quick widget"), ("faster", "quicker"))
    slow = implementation(f"lazyreg_impl_{tmp_path.name}_slow", ("slow", "a slow widget"))
    reg = make(("slow", slow, "a slow widget"), ("fast", fast, "a quick widget"), ("faster", fast, "quicker"))
    assert reg.descriptions() == [("slow", "a slow widget"), ("fast", "a quick widget"), ("faster", "quicker")]
    assert "fast" in reg and "nope" not in reg and ["x"] not in reg and len(reg) == 3
    assert reg.names() == ["fast", "faster", "slow"] and list(reg) == ["slow", "fast", "faster"]
    assert fast not in sys.modules and slow not in sys.modules  # listing imported nothing
    assert reg.get("fast") == _Impl("fast", "a quick widget")
    assert fast in sys.modules and slow not in sys.modules  # only the module of the entry looked up
    with pytest.raises(FedleakError, match=r"^unknown widget 'nope'; available: fast, faster, slow$"):
        reg.get("nope")
    assert [name for name, _ in reg.items()] == ["slow", "fast", "faster"] and slow in sys.modules
    reg.register("plug-in", _Impl("plug-in", "outside the catalog"))  # plug-ins need no catalog entry
    assert reg.descriptions()[-1] == ("plug-in", "outside the catalog") and reg.get("plug-in").name == "plug-in"


def test_lazy_registry_refuses_code_that_disagrees_with_its_catalog(lazy_home, tmp_path) -> None:
    make, implementation = lazy_home
    wrong = implementation(f"lazyreg_impl_{tmp_path.name}_wrong", ("fast", "described differently"))
    silent = implementation(f"lazyreg_impl_{tmp_path.name}_silent")
    reg = make(("fast", wrong, "a quick widget"), ("ghost", silent, "never registered"))
    with pytest.raises(RuntimeError, match="widget 'fast' does not match its catalog entry.*'a quick widget'.*"
                                           "'described differently'"):
        reg.get("fast")
    with pytest.raises(RuntimeError, match=f"importing {silent} registers widget 'ghost', but it did not"):
        reg.get("ghost")


def test_lazy_registry_reports_a_catalog_name_claimed_elsewhere_as_registered_twice(lazy_home, tmp_path) -> None:
    make, implementation = lazy_home
    fast = implementation(f"lazyreg_impl_{tmp_path.name}_fast", ("fast", "a quick widget"))
    reg = make(("fast", fast, "a quick widget"))
    with pytest.raises(RuntimeError, match="widget 'fast' is registered twice"):
        reg.register("fast", _Impl("fast", "a quick widget"))  # imports the catalog's module first
    assert reg.get("fast") == _Impl("fast", "a quick widget")


def _import_every_module(package: str) -> None:
    """Import every module of ``package``, so that a registration missing from the catalog shows up."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for module in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(module.name)


def test_attack_catalog_matches_the_registered_attacks() -> None:
    from fedleak.attacks import available_attacks
    from fedleak.attacks.catalog import ATTACK_CATALOG

    _import_every_module("fedleak.attacks")
    registered = available_attacks()
    assert sorted(registered) == sorted(entry.name for entry in ATTACK_CATALOG)
    for entry in ATTACK_CATALOG:
        info = registered[entry.name]
        assert info.spec == entry.about, entry.name  # update kinds, description, needs_relu_network
        assert info.run.__module__ == entry.module, entry.name


def test_dataset_catalog_matches_the_registered_data_sets() -> None:
    from fedleak.data.registry import DATASET_CATALOG, dataset_loaders

    _import_every_module("fedleak.data")
    registered = dataset_loaders()
    assert sorted(registered) == sorted(entry.name for entry in DATASET_CATALOG)
    for entry in DATASET_CATALOG:
        assert registered[entry.name].description == entry.about, entry.name
        assert registered[entry.name].load.__module__ == entry.module, entry.name


def test_model_catalog_matches_the_registered_models() -> None:
    from fedleak.models.catalog import BUILTIN_MODELS, MODEL_CATALOG

    registered = dict(BUILTIN_MODELS.items())  # imports fedleak.models.zoo
    assert sorted(registered) == sorted(entry.name for entry in MODEL_CATALOG)
    for entry in MODEL_CATALOG:
        assert registered[entry.name].description == entry.about, entry.name
        assert registered[entry.name].build.__module__ == entry.module, entry.name
