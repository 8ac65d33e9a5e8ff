"""No warnings on the console unless ``fedleak --verbose``: Python warnings raised while a command runs (numpy's,
a plug-in's, Flower's and Ray's) are hidden without it and shown with it."""

from __future__ import annotations

import subprocess
import sys
import warnings

from fedleak.cli import main

# a user's plug-in data set whose loader warns twice: numpy's nanmean of nothing, and a warning of its own. One fresh
# interpreter runs the audit twice: first without --verbose (nothing was shown or recorded before it), then with it,
# a marker line on stderr between the two.
MARK = "--- now with --verbose ---"
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

out, mark = sys.argv[1:3]
args = ["audit", "--data", "noisy-squares", "--widths", "16", "--batch-sizes", "1", "--quiet", "--attack",
        "exclusivity", "--out"]
quiet = main([*args, out + "-quiet"])
print(mark, file=sys.stderr, flush=True)
verbose = main(["--verbose", *args, out + "-verbose"])
sys.exit(quiet or verbose)
"""


def test_warnings_are_hidden_without_verbose_and_shown_with_it(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", _PLUGIN_AND_MAIN, str(tmp_path / "out"), MARK], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    quiet, verbose = proc.stderr.split(MARK + "\n")
    assert quiet == ""  # the run without --verbose
    assert "recovered" in proc.stdout
    assert all((tmp_path / f"out-{run}" / "results.json").exists() for run in ("quiet", "verbose"))
    assert "RuntimeWarning: Mean of empty slice" in verbose
    assert "UserWarning: the plug-in's own warning" in verbose


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


def test_a_progress_bar_shows_only_on_a_terminal(monkeypatch, capsys) -> None:
    """In a pipe or a log file the bar's redrawn lines would be noise: none there, one on a terminal, none with
    --quiet."""
    from fedleak.cli.app import progress_bar, shows_progress

    for terminal, quiet, shown in ((False, False, False), (True, True, False), (True, False, True)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        assert shows_progress(quiet) is shown
        bar = progress_bar(quiet, 3, "auditing", "batch")
        assert (bar is not None) is shown
        if bar is not None:
            assert list(bar(range(3))) == [0, 1, 2]
            assert "auditing" in capsys.readouterr().err


def test_a_piped_audit_writes_no_progress_bar(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedleak", "audit", "--data", "digits", "--widths", "16",
                           "--batch-sizes", "1", "--attack", "exclusivity", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "recovered" in proc.stdout
