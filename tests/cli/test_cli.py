import json
import re
import subprocess
import sys

import pytest
import torch

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


def test_reconstruct_command_from_captured_files(tmp_path, capsys, fashion):
    import numpy as np

    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(fedleak.compute_gradient_update(model, x, y), tmp_path / "update.safetensors")
    out = tmp_path / "rec"
    assert main(["reconstruct", "--model", str(tmp_path / "model.safetensors"), "--update",
                 str(tmp_path / "update.safetensors"), "--out", str(out)]) == 0
    saved = np.load(out / "reconstruction.npz")
    assert saved["x"].shape == (4, 1, 28, 28) and saved["certified"].all()
    assert sorted(saved["y"].tolist()) == sorted(y.tolist())
    scores = fedleak.metrics.match(torch.from_numpy(saved["x"]), x)
    assert (scores.max_abs_error < 1e-4).all()
    payload = json.loads((out / "results.json").read_text())
    assert payload["summary"]["inferred_batch_size"] == 4 and len(payload["samples"]) == 4


def test_reconstruct_command_with_a_summed_loss(tmp_path, capsys, fashion):
    import torch.nn.functional as F

    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(fedleak.GradientUpdate(grads, num_examples=4), tmp_path / "update.safetensors")
    torch.save(grads, tmp_path / "bare.pt")  # a bare gradient file records no number of examples
    torch.save(list(grads.values()), tmp_path / "list.pt")  # a list in model.parameters() order, keyed by the model

    def run(update: str, *extra: str) -> tuple[int, str]:
        code = main(["reconstruct", "--model", str(tmp_path / "model.safetensors"), "--update", str(tmp_path / update),
                     "--attack", "exclusivity", *extra, "--out", str(tmp_path / "-".join(("out", update, *extra)))])
        out = capsys.readouterr()
        return code, out.out + out.err

    for update, extra, code, said in [
        ("update.safetensors", (), 0, "4 certified"),  # read as a mean loss: its samples' scale tells otherwise
        ("update.safetensors", ("--loss-reduction", "sum"), 0, "4 certified"),
        ("update.safetensors", ("--loss-reduction", "max"), 2, "loss_reduction must be 'mean' or 'sum'"),
        ("bare.pt", ("--loss-reduction", "sum"), 0, "0 certified"),  # the batch size is unknown
        ("bare.pt", ("--loss-reduction", "sum", "--num-examples", "4"), 0, "4 certified"),
        ("bare.pt", ("--num-examples", "0"), 2, "num_examples"),
        ("list.pt", ("--loss-reduction", "sum", "--num-examples", "4"), 0, "4 certified"),
    ]:
        got = run(update, *extra)
        assert got[0] == code and said in got[1], (update, extra, got)


def _exact_reconstruct(tmp_path, capsys, model, update):
    """``fedleak reconstruct --attack exclusivity`` of ``update`` (saved with ``model``), with extra arguments:
    its exit code and what it printed; each run writes to its own folder, named by the arguments."""
    import fedleak

    fedleak.save_mlp(model, tmp_path / "model.safetensors")
    fedleak.save_update(update, tmp_path / "update.safetensors")

    def run(*extra: str) -> tuple[int, str]:
        code = main(["reconstruct", "--model", str(tmp_path / "model.safetensors"), "--update",
                     str(tmp_path / "update.safetensors"), "--attack", "exclusivity", *extra,
                     "--out", str(tmp_path / "-".join(("out", *extra)))])
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


def test_reconstruct_command_with_label_smoothing(tmp_path, capsys, fashion):
    import torch.nn.functional as F

    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    run = _exact_reconstruct(tmp_path, capsys, model, fedleak.GradientUpdate(grads, num_examples=4))
    for extra, code, said in [
        ((), 0, "4 certified"),  # read off the update
        (("--label-smoothing", "0.1"), 0, "4 certified"),
        (("--label-smoothing", "0"), 0, "0 certified"),  # told a plain cross-entropy
        (("--label-smoothing", "1.5"), 2, "label_smoothing must be below 1"),
    ]:
        got = run(*extra)
        assert got[0] == code and said in got[1] and "Traceback" not in got[1], (extra, got)
    notes = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["notes"]
    assert any("label smoothing 0.1" in n for n in notes)


def test_reconstruct_command_with_class_weights(tmp_path, capsys, fashion):
    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    weights = ",".join(str(w) for w in range(1, 11))
    update = fedleak.compute_gradient_update(model, x, y, class_weights=tuple(range(1, 11)))
    run = _exact_reconstruct(tmp_path, capsys, model, update)
    for extra, code, said in [
        (("--class-weights", weights), 0, "4 certified"),
        (("--class-weights", "1,2"), 2, "has 2 entries, but the model has 10"),
        (("--class-weights", "a,b"), 2, "--class-weights must be comma-separated numbers"),
        (("--class-weights", weights, "--label-smoothing", "0.1"), 2, "with label_smoothing is not supported"),
    ]:
        got = run(*extra)
        assert got[0] == code and said in got[1] and "Traceback" not in got[1], (extra, got)
    told = json.loads((tmp_path / f"out---class-weights-{weights}" / "results.json").read_text())["settings"]
    assert told["options"]["class_weights"] == list(range(1, 11))  # what the attack was told is recorded


def test_reconstruct_command_with_a_focal_loss(tmp_path, capsys, fashion):
    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=0)
    run = _exact_reconstruct(tmp_path, capsys, model, fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0))
    for extra, code, said in [
        ((), 0, "0 certified"),
        (("--focal-gamma", "2"), 0, "8 certified"),
        (("--focal-gamma", "-1"), 2, "focal_gamma (of ExclusivityOptions) must be at least 0"),
        (("--focal-gamma", "2", "--label-smoothing", "0.1"), 2, "focal_gamma with label_smoothing"),
    ]:
        got = run(*extra)
        assert got[0] == code and said in got[1] and "Traceback" not in got[1], (extra, got)
    assert "needs --focal-gamma" in run()[1]  # the reason points to the option
    told = json.loads((tmp_path / "out---focal-gamma-2" / "results.json").read_text())["settings"]
    assert told["options"]["focal_gamma"] == 2.0


def test_reconstruct_command_with_the_clients_defense(tmp_path, capsys, fashion):
    """``--defense``: a per-layer clipped gradient certifies when the attack is told the bound, and when it is not
    (read off the layers' equal norms, and said); a defense the attack cannot take, or an unknown one, is one line and
    exit 2."""
    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    sent = fedleak.defended_gradient(model, x, y, "clipping:bound=0.5", seed=0)
    run = _exact_reconstruct(tmp_path, capsys, model, sent.update)
    for extra, code, said in [
        ((), 0, "4 certified"),
        (("--defense", "clipping:bound=0.5"), 0, "4 certified"),
        (("--defense", "clipping:bound=0.5", "--attack", "first-layer"), 2,
         "unknown first-layer option(s): ['defense']"),
        (("--defense", "nonsense"), 2, "unknown defense 'nonsense'"),
    ]:
        got = run(*extra)
        assert got[0] == code and said in got[1] and "Traceback" not in got[1], (extra, got)
    told = json.loads((tmp_path / "out---defense-clipping:bound=0.5" / "results.json").read_text())["settings"]
    assert told["options"]["defense"] == "clipping:bound=0.5"


def test_reconstruct_command_with_train_dropout(tmp_path, capsys, fashion):
    """``--train-dropout`` reads the update as a training-mode client's (uncertified), ``--eval-dropout`` in eval
    mode only; what the attack was told is recorded."""
    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    run = _exact_reconstruct(tmp_path, capsys, model, fedleak.compute_gradient_update(model, x, y))
    for extra, said in [(("--train-dropout",), "4 sample(s) rebuilt, 0 certified"), (("--eval-dropout",), "4 certified")]:
        got = run(*extra)
        assert got[0] == 0 and said in got[1] and "Traceback" not in got[1], (extra, got)
    told = json.loads((tmp_path / "out---train-dropout" / "results.json").read_text())
    assert told["settings"]["options"]["train_dropout"] is True
    assert all("train-mode dropout" in s["route"] for s in told["samples"])


def test_reconstruct_command_peels_unless_told_not_to(tmp_path, capsys, fashion):
    """The exact route peels by default; ``--no-peel`` reads the update once, and the results record it."""
    import fedleak

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(32, seed=0)
    run = _exact_reconstruct(tmp_path, capsys, model, fedleak.compute_gradient_update(model, x, y))
    peeled, once = run(), run("--no-peel")
    assert peeled[0] == once[0] == 0 and "Traceback" not in peeled[1] + once[1]
    count = [int(re.search(r"(\d+) certified", got[1]).group(1)) for got in (peeled, once)]
    assert count[0] >= 28 > 16 > count[1]  # (measured: 31 or 32, and 6)
    told = json.loads((tmp_path / "out---no-peel" / "results.json").read_text())
    assert told["settings"]["options"]["peel"] is False


def test_reconstruct_command_with_the_data_s_range(tmp_path, capsys, digits):
    """``--data-range -1,1`` (data normalised with mean and std 0.5) goes to the attacks that read it and into the
    results' settings; a range of another length, or one given to an attack that does not read it, is refused."""
    import numpy as np

    import fedleak

    data = digits.normalized(0.5, 0.5)
    model = fedleak.make_mlp(data.input_shape, [32], 10, seed=0)
    x, y = data.batch(2, seed=0)
    fedleak.save_mlp(model, tmp_path / "m.safetensors")
    fedleak.save_update(fedleak.compute_gradient_update(model, x, y), tmp_path / "u.safetensors")

    def run(*extra: str) -> tuple[int, str]:
        code = main(["reconstruct", "--model", str(tmp_path / "m.safetensors"), "--update",
                     str(tmp_path / "u.safetensors"), "--out", str(tmp_path / "-".join(("o", *extra))), *extra])
        out = capsys.readouterr()
        return code, out.out + out.err

    assert run("--attack", "ig", "--data-range", "-1,1")[0] == 0
    saved = json.loads((tmp_path / "o---attack-ig---data-range--1,1" / "results.json").read_text())
    assert saved["settings"]["options"]["data_range"] == [-1.0, 1.0]
    rebuilt = np.load(tmp_path / "o---attack-ig---data-range--1,1" / "reconstruction.npz")["x"]
    assert rebuilt.min() >= -1.0 and rebuilt.min() < 0.0
    code, said = run("--attack", "ig", "--data-range", "1")
    assert code == 2 and "--data-range must be two numbers LOW,HIGH" in said
    code, said = run("--attack", "trap-weights", "--data-range=-1,1")
    assert code == 2 and "does not read the data's range" in said and "Traceback" not in said


def test_reconstruct_command_with_a_mismatched_update(tmp_path, capsys, digits):
    import fedleak

    a = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    b = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    fedleak.save_mlp(a, tmp_path / "a.safetensors")
    fedleak.save_update(fedleak.compute_gradient_update(b, digits.x[:2], digits.y[:2]), tmp_path / "u.safetensors")
    code = main(["reconstruct", "--model", str(tmp_path / "a.safetensors"), "--update", str(tmp_path / "u.safetensors"),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "has shape" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_audit_of_the_users_own_model_file(tmp_path, capsys):
    import fedleak

    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, [300], 10, seed=9)
    fedleak.save_mlp(model, tmp_path / "mine.safetensors")
    out = tmp_path / "o"
    assert main(["audit", "--model", str(tmp_path / "mine.safetensors"), "--batch-sizes", "2", "--out", str(out),
                 "--quiet"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["model"].endswith("mine.safetensors")
    assert payload["batches"][0]["batch_size"] == 2
    wrong = fedleak.make_mlp(data.input_shape, [30], 7, seed=0)
    fedleak.save_mlp(wrong, tmp_path / "wrong.safetensors")
    assert main(["audit", "--model", str(tmp_path / "wrong.safetensors"), "--batch-sizes", "2", "--out", str(out),
                 "--quiet"]) == 2
    assert "7 outputs" in capsys.readouterr().err


def _commands() -> dict:
    import typer

    from fedleak.cli import app

    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(_commands()))
def test_shared_options_are_spelled_and_described_alike(name):
    from pathlib import Path

    from fedleak.cli.app import DATA_HELP, OUT_HELP, QUIET_HELP, WIDTHS_HELP

    options = {p.name: p for p in _commands()[name].params}
    for option, text in (("data", DATA_HELP), ("widths", WIDTHS_HELP), ("quiet", QUIET_HELP), ("out", OUT_HELP)):
        if option in options:  # the shared description first; what is particular to the command may follow
            assert options[option].help.startswith(text), f"{name} --{option}"
            assert options[option].opts == [f"--{option}"], f"{name} --{option}"
    assert "hidden" not in options or options["hidden"].hidden  # federate's old name of --widths
    if "out" in options:
        assert options["out"].default == Path(f"fedleak-{name}")


def test_verbose_is_a_root_option(capsys):
    assert main(["--verbose", "info"]) == 0
    assert "exclusivity" in capsys.readouterr().out
    assert main(["info", "--verbose"]) == 2  # not a sub-command's option (federate keeps its old one)
    assert "No such option '--verbose'" in capsys.readouterr().err


def test_the_audit_table_shows_what_a_defense_leaks_without_certificates(tmp_path, capsys):
    """Half-precision uploads withhold every certificate: "recovered" reads 0%, and "exact" shows the samples the
    attack still rebuilt exactly (at batch 1, all of them)."""
    code = main(["audit", "--data", "digits", "--widths", "256", "--batch-sizes", "1", "--seed", "1", "--defense",
                 "half-precision", "--out", str(tmp_path / "audit"), "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].split()[4:6] == ["recovered", "exact"]
    half = next(line.split() for line in lines if line.startswith("half-precision "))
    assert half[4:6] == ["0%", "100%"]


def test_an_error_names_the_command_lines_options_not_the_librarys_arguments(tmp_path, capsys):
    """A global-pooling CNN fixes no input size: the one line says to pass --input-shape, as the command spells it."""
    (tmp_path / "gap.py").write_text(
        "import torch.nn as nn\nimport torch.nn.functional as F\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)\n\n"
        "    def forward(self, x):\n        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).mean((2, 3)))))\n")
    code = main(["check", "--model", f"{tmp_path / 'gap.py'}:Net"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pass --input-shape 1,H,W" in err and "input_shape=" not in err
    assert main(["check", "--model", f"{tmp_path / 'gap.py'}:Net", "--input-shape", "1,6,6"]) == 0
