"""The script's entry point holds Ctrl-C while a module is being imported and raises it once the import is done;
elsewhere Ctrl-C raises at once, and a SIGINT the process ignores stays ignored."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from fedleak.launch import HeldDuringImports


@pytest.fixture
def default_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_an_import_is_raised_after_it(tmp_path, monkeypatch, default_sigint):
    (tmp_path / "interrupted_module.py").write_text(
        "import signal, time\n"
        "signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of this module's import\n"
        "time.sleep(0.1)\n"
        "DONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    with HeldDuringImports(), pytest.raises(KeyboardInterrupt):
        import interrupted_module

        seen.append(interrupted_module.DONE)  # the import ran to its end
        time.sleep(2)  # the held Ctrl-C arrives here
    assert seen == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    sys.modules.pop("interrupted_module", None)


def test_a_second_ctrl_c_inside_an_import_is_raised_at_once(tmp_path, monkeypatch, default_sigint):
    """An import that runs long (a model file that trains when imported) can still be stopped: the second Ctrl-C
    raises inside it."""
    (tmp_path / "long_module.py").write_text(
        "import signal, time\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "time.sleep(0.2)  # held: the checks find the import still running\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "DONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with HeldDuringImports(), pytest.raises(KeyboardInterrupt):
        import long_module  # noqa: F401
    assert "long_module" not in sys.modules  # the import did not finish


def test_ctrl_c_outside_an_import_is_raised_at_once(default_sigint):
    with HeldDuringImports(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        time.sleep(2)


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with HeldDuringImports():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
