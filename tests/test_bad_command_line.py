"""Every bad input given on the command line: one line ``fedleak: error: ...`` on stderr and exit code 2 (130 for
Ctrl-C), no traceback and no output folder left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from bad_input import SHAPE

import fedleak
from fedleak.cli import main
from fedleak.errors import OutputError


@pytest.fixture
def files(tmp_path, model, update) -> dict[str, Path]:
    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(update, tmp_path / "update.safetensors")
    torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "pickled.pt")
    return {"model": tmp_path / "model.safetensors", "update": tmp_path / "update.safetensors",
            "pickled": tmp_path / "pickled.pt", "out": tmp_path / "out"}


def _cli_fails(capsys, args: list[str], fragment: str, code: int = 2) -> str:
    """Run the CLI expecting exit ``code`` and one stderr line ``fedleak: error: ...`` holding ``fragment``."""
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error:") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err, err
    return err


def _reconstruct(files: dict[str, Path], *extra: str, update: str = "update") -> list[str]:
    return ["reconstruct", "--model", str(files["model"]), "--update", str(files[update]), "--out",
            str(files["out"]), *extra]


def _audit(out: Path, *extra: str) -> list[str]:
    return ["audit", "--batch-sizes", "1", "--widths", "8", "--out", str(out), "--quiet", *extra]


class TestCommandLine:
    @pytest.mark.parametrize(
        "extra, fragment",
        [
            (("--input-shape", "-1,-64"), "--input-shape must be"),
            (("--input-shape", "-1,-16"), "--input-shape must be"),
            (("--seed", "-1"), "--seed must lie in"),
            (("--seed", str(2**70)), "--seed must lie in"),
            (("--seed", "abc"), "'abc' is not a valid integer"),
        ],
    )
    def test_reconstruct_bad_options(self, capsys, files, extra, fragment):
        _cli_fails(capsys, _reconstruct(files, *extra), fragment)
        assert not files["out"].exists()

    def test_reconstruct_pickled_update(self, capsys, files):
        err = _cli_fails(capsys, _reconstruct(files, update="pickled"), "never unpickles")
        assert "weights_only" not in err
        assert not files["out"].exists()

    @pytest.mark.parametrize(
        "extra, fragment",
        [
            (("--widths", "1000000000000"), "--widths must lie in [1, 100,000]"),
            (("--widths", "8,-3"), "--widths must"),
            (("--conv", "0"), "--conv must"),
            (("--seed", "-1"), "--seed must lie in"),
            (("--seed", str(2**70)), "--seed must lie in"),
            (("--data", "/no/such/data"), "neither a built-in data set"),
        ],
    )
    def test_audit_bad_options(self, capsys, tmp_path, extra, fragment):
        _cli_fails(capsys, _audit(tmp_path / "out", *extra), fragment)
        assert not (tmp_path / "out").exists()

    def test_results_json_blocked_by_a_folder(self, capsys, tmp_path):
        (tmp_path / "out" / "results.json").mkdir(parents=True)
        _cli_fails(capsys, _audit(tmp_path / "out"), "results.json")
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no report.html alone

    def test_a_failing_run_leaves_no_output_folder(self, capsys, files, digits):
        other = fedleak.make_mlp(SHAPE, [8], 3, seed=1)  # the update does not match this model
        fedleak.save_mlp(other, files["model"])
        _cli_fails(capsys, _reconstruct(files), "has shape (16, 16)")
        assert not files["out"].exists()
        assert sorted(p.name for p in files["out"].parent.iterdir()) == ["model.safetensors", "pickled.pt",
                                                                         "update.safetensors"]

    def test_a_failing_write_leaves_nothing_half_written(self, capsys, files, monkeypatch):
        import fedleak.report.reconstruction as report

        def broken(path, payload):
            raise OutputError(f"cannot write {path}: disk full")

        monkeypatch.setattr(report, "write_json", broken)
        _cli_fails(capsys, _reconstruct(files, "--attack", "exclusivity"), "disk full")
        assert not files["out"].exists()
        assert not [p for p in files["out"].parent.iterdir() if p.name.startswith(".")]  # no staging left

    def test_ctrl_c_during_start_up(self, capsys, tmp_path, monkeypatch):
        import fedleak.cli.audit as audit_cli

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(audit_cli, "check_output_dir", interrupt)
        assert main(_audit(tmp_path / "out")) == 130
        assert capsys.readouterr().err == "fedleak: interrupted\n"
        assert not (tmp_path / "out").exists()

    def test_ctrl_c_before_a_command_runs(self, capsys, monkeypatch):
        import fedleak.cli as cli

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "app", interrupt)
        assert main(["info"]) == 130
        assert capsys.readouterr().err == "fedleak: interrupted\n"


def _catches_sigint(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGINT (Linux's /proc; elsewhere assumed so)."""
    import signal

    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next((line.split()[1] for line in status if line.startswith("SigCgt:")), None)
    except OSError:
        return True
    return caught is None or bool(int(caught, 16) >> (signal.SIGINT - 1) & 1)


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """A real SIGINT while the script is still starting (importing torch) or already auditing: one line, exit code
    130, no traceback, no output folder. The audit of a real data set takes seconds, so the signal always arrives
    before it ends, however fast the machine."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    # a shell's background job (``pytest ... &``) inherits SIGINT ignored, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "fedleak", "audit", "--data", "digits", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # a SIGINT before the interpreter has installed its handler kills any Python process: on a loaded machine its
    # start can take longer than the wait below, so the signal is sent only once a handler is in place
    deadline = time.monotonic() + 30
    while not _catches_sigint(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not out.exists()
