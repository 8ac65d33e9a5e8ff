"""``--defense SPEC`` on ``fedleak audit`` and ``fedleak federate``, and the defenses ``fedleak info`` lists: all
from the one defense registry; a bad spec is one line and exit code 2, before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedleak.cli import main


def test_audit_defense_options_are_scenarios(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", "--data", "digits", "--widths", "64", "--batch-sizes", "2", "--defense", "top-k:ratio=0.1",
                 "--defense", "mixup", "--defense", "gaussian-noise:sigma=0.1,clip=1", "--out", str(out), "--quiet"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert [r["scenario"] for r in payload["summary"]] == [
        "plain", "top-k(ratio=0.1)", "mixup", "gaussian-noise(sigma=0.1, clip=1)"]
    assert payload["settings"]["defenses"] == ["top-k:ratio=0.1", "mixup", "gaussian-noise:sigma=0.1,clip=1"]
    text = capsys.readouterr().out
    assert "top-k(ratio=0.1): no formal privacy guarantee" in text
    assert "gaussian-noise(sigma=0.1, clip=1): epsilon " in text and "per client (batch 2, opacus-rdp)" in text


@pytest.mark.parametrize("args, message", [
    (["audit", "--defense", "topk"], "unknown defense 'topk'; available: "),
    (["audit", "--defense", "top-k:ratio=2"], "ratio"),
    (["audit", "--defense", "mixup", "--defense", "mixup"], "given twice"),
    (["federate", "--defense", "top-k:rate=0.1"], "defense 'top-k' has no parameter 'rate'"),
    (["federate", "--defense", "local-dp", "--defense", "top-k:ratio=0.1"], "put them last"),
    (["federate", "--defense", "gaussian-noise"], "sigma"),  # a required parameter missing
])
def test_a_bad_defense_spec_is_one_line(tmp_path, capsys, args, message):
    code = main([*args, "--widths", "8", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedleak: error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_old_defense_options_are_gone(tmp_path, capsys):
    for old in (["federate", "--defense-strength", "0.1"], ["federate", "--clip-norm", "1"]):
        assert main([*old, "--out", str(tmp_path / "o")]) == 2
        assert "No such option" in capsys.readouterr().err


def test_help_and_info_list_the_registry_without_torch():
    """What the command line lists without importing torch equals the registry (fedleak.defenses)."""
    code = """
import contextlib, io, json, sys
from fedleak.cli import main
from fedleak.defenses import available_defenses, defense_names
pages = {}
for args in (['info'], ['federate', '--help'], ['audit', '--help']):
    page = io.StringIO()
    with contextlib.redirect_stdout(page):
        assert main(args) == 0, args
    pages[' '.join(args)] = ' '.join(page.getvalue().split())
assert 'torch' not in sys.modules
print(json.dumps({'names': defense_names(), 'catalog': available_defenses(), 'pages': pages}))
"""
    env = {**os.environ, "COLUMNS": "300"}  # rich wraps help to the terminal; wide enough for every name
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    from fedleak.defenses import defense_classes

    registry = {c.name: f"{c.stage.value}: {c.summary} ({c.source})" for c in defense_classes()}  # imports them all
    assert {"top-k", "mixup", "dp-sgd", "local-dp", "central-dp"} <= set(registry)
    assert seen["catalog"] == registry and seen["names"] == sorted(registry)  # the catalog = what is registered
    info = seen["pages"]["info"]
    for name, text in registry.items():
        assert f"{name} {' '.join(text.split())}" in info, name
    for page in ("federate --help", "audit --help"):
        listed = seen["pages"][page].replace("│", " ")
        assert all(name in listed for name in registry), page
