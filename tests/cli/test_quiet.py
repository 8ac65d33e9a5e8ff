"""No warnings on the console unless ``fedleak --verbose``: Python warnings raised while a command runs (numpy's,
a plug-in's, Flower's and Ray's) are hidden without it and shown with it."""

from __future__ import annotations

import subprocess
import sys
import warnings

from fedleak.cli import main

# a user's plug-in data set whose loader warns twice: numpy's nanmean of nothing, and a warning of its own
_PLUGIN_AND_MAIN = """
import sys, warnings
import numpy as np
import fedleak
from fedleak.cli import main
from fedleak.data import register_dataset

@register_dataset("noisy-squares", "random 4x4 images in two classes, from a loader that warns")
def noisy_squares():
    import torch

    np.nanmean(np.array([np.nan]))
    warnings.warn("the plug-in's own warning")
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return fedleak.Dataset("noisy-squares", x, torch.arange(16) % 2, ("a", "b"))

sys.exit(main(sys.argv[1:]))
"""


def _audit(tmp_path, *root_options: str) -> subprocess.CompletedProcess[str]:
    args = [*root_options, "audit", "--data", "noisy-squares", "--widths", "16", "--batch-sizes", "1", "--quiet",
            "--attack", "exclusivity", "--out", str(tmp_path / "out")]
    return subprocess.run([sys.executable, "-c", _PLUGIN_AND_MAIN, *args], capture_output=True, text=True,
                          timeout=120)


def test_a_run_without_verbose_prints_no_warning(tmp_path) -> None:
    proc = _audit(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "recovered" in proc.stdout and (tmp_path / "out" / "results.json").exists()


def test_verbose_shows_the_warnings(tmp_path) -> None:
    proc = _audit(tmp_path, "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning: Mean of empty slice" in proc.stderr
    assert "UserWarning: the plug-in's own warning" in proc.stderr


def test_the_callers_warning_filters_are_restored(tmp_path, capsys) -> None:
    before = list(warnings.filters)
    assert main(["audit", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["info"]) == 0
        warnings.warn("after the command")
    assert [str(w.message) for w in caught] == ["after the command"]
    capsys.readouterr()


def test_the_old_widths_option_is_silent_unless_verbose(tmp_path, capsys) -> None:
    base = ["federate", "--hidden", "64", "--threat", "psychic", "--out", str(tmp_path / "o")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error: unknown threat 'psychic'") and err.count("\n") == 1
    for args in (["--verbose", *base], [*base, "--verbose"]):  # the root option, and federate's own old one
        assert main(args) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0] == "fedleak: --hidden is deprecated; use --widths" and err[1].startswith("fedleak: error:")
    assert main(["federate", "--hidden", "64", "--widths", "32", "--out", str(tmp_path / "o")]) == 2
    assert "give --widths only" in capsys.readouterr().err


def test_processes_a_quiet_federation_starts_ignore_warnings() -> None:
    from fedleak.federation.run import isolated_environment

    child = [sys.executable, "-c", "import warnings; warnings.warn('from a worker')"]
    with isolated_environment(quiet=True):
        quiet = subprocess.run(child, capture_output=True, text=True, timeout=60)
    with isolated_environment(quiet=False):
        loud = subprocess.run(child, capture_output=True, text=True, timeout=60)
    assert quiet.stderr == "" and "UserWarning: from a worker" in loud.stderr
