"""The command line starts without torch: ``fedleak info`` and every ``--help`` list what they list from the
registries' catalogs. Checked in fresh interpreters through ``sys.modules`` (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys

from fedleak.attacks.catalog import ATTACK_CATALOG
from fedleak.data.registry import DATASET_CATALOG


def _run(code: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_info_lists_the_catalogs_without_importing_torch() -> None:
    proc = _run("import sys; from fedleak.cli import main; code = main(['info']); "
                "assert code == 0, code; assert 'torch' not in sys.modules, 'torch imported'")
    lines = proc.stdout.splitlines()
    for entry in (*ATTACK_CATALOG, *DATASET_CATALOG):
        description = entry.about if isinstance(entry.about, str) else entry.about.description
        assert any(line.split()[:1] == [entry.name] and description in line for line in lines), entry.name
    assert proc.stderr == ""


def test_every_help_page_starts_without_torch() -> None:
    code = """
import contextlib, io, sys
import typer
from fedleak.cli import app, main
names = sorted(typer.main.get_command(app).commands)
assert {'audit', 'demo', 'federate', 'info', 'reconstruct'} <= set(names), names
for args in [['--help']] + [[name, '--help'] for name in names]:
    page = io.StringIO()
    with contextlib.redirect_stdout(page):
        assert main(args) == 0, args
    assert 'Usage' in page.getvalue(), args
    assert 'torch' not in sys.modules, f'{args} imported torch'
print(len(names))
"""
    assert int(_run(code).stdout) >= 5


def test_listing_attacks_and_data_sets_imports_none_of_them() -> None:
    _run("import sys, fedleak; from fedleak.attacks import attack_specs; "
         "specs = attack_specs(); sets = fedleak.available_datasets(); "
         "assert specs['exclusivity'].needs_relu_network and 'digits' in sets; "
         "assert 'torch' not in sys.modules and 'fedleak.attacks.exact' not in sys.modules; "
         "assert 'fedleak.data.builtin' not in sys.modules")
