import json
import subprocess
import sys

import pytest

from fedleak.cli import main


def test_demo_writes_results_and_report(tmp_path, capsys, monkeypatch):
    # the demo with its defaults is exercised by `make demo`; here a reduced audit keeps the suite fast
    out = tmp_path / "audit"
    code = main(["audit", "--data", "digits", "--widths", "256", "--batch-sizes", "1,4", "--seed", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["seed"] == 1 and [r["batch_size"] for r in payload["summary"]] == [1, 4]
    assert (out / "report.html").stat().st_size > 1000
    assert "recovered" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["audit", "--data", "/no/such/dir"], "neither a built-in data set"),
        (["audit", "--widths", "a,b"], "--widths must be comma-separated"),
        (["audit", "--attack", "nope", "--batch-sizes", "1", "--widths", "8"], "unknown attack"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main([*args, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedleak: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o" / "results.json").exists()


def test_output_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert main(["audit", "--batch-sizes", "1", "--widths", "8", "--out", str(f), "--quiet"]) == 2
    assert f.read_text() == "keep me"
    assert "not a folder" in capsys.readouterr().err


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedleak", "audit", "--data", str(tmp_path / "x.npz"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("fedleak: error:")
