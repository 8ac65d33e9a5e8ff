"""The generic registry and the options-from-keywords helper every pluggable part uses."""

from dataclasses import dataclass, field

import pytest

from fedleak.errors import DataError, FedleakError, OptionError
from fedleak.registry import Registry
from fedleak.validation import options_from


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
