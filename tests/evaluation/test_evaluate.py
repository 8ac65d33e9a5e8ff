"""fedleak.evaluate: leakage x utility x cost per defense setting, resumable, with a Pareto front and a report."""

import json

import pytest

from fedleak.cli import main
from fedleak.errors import FedleakError, OutputError
from fedleak.evaluation import EvaluationSettings, evaluate, expand, pareto_front, write_evaluation
from fedleak.evaluation.cells import DefenseRow, LeakageCell, UtilityCell

SMALL = dict(data="digits", test_data=None, test_size=300, widths=(128,), attacks=("exclusivity",), attack_batch=2,
             trials=1, rounds=4, clients=2, client_size=100, batch_size=8)


def test_grid_expands_bare_names_into_their_strengths():
    settings = EvaluationSettings(**SMALL, defenses=("top-k", "quantize:bits=8",
                                                     "clipping:bound=1 + gaussian-noise:sigma=0.1"))
    labels = [s.label for s in settings.grid()]
    assert labels[0] == "none"
    assert len([lab for lab in labels if lab.startswith("top-k")]) == len(expand("top-k")) >= 2
    assert "quantize" in labels[1 + len(expand("top-k"))]
    assert any(" + " in lab for lab in labels)


@pytest.mark.parametrize("bad, message", [
    ({"defenses": ("no-such-defense",)}, "unknown defense"),
    ({"defenses": ("top-k:ratio=2",)}, "ratio"),
    ({"attacks": ("nope",)}, "unknown attack"),
    ({"batch_size": 1000}, "client_size"),
])
def test_bad_settings_are_refused_with_the_reason(bad, message):
    with pytest.raises(FedleakError, match=message):
        EvaluationSettings(**{**SMALL, **bad})


def test_evaluation_measures_leakage_utility_cost_and_epsilon(tmp_path):
    ev = evaluate(EvaluationSettings(**SMALL, defenses=("top-k:ratio=0.01", "gaussian-noise:sigma=0.5,clip=1.0")),
                  out=tmp_path)
    rows = {r.defense: r for r in ev.rows}
    base = rows["none"]
    # undefended: the exact attack certifies both samples of an 8x8 digits batch on a 128-wide MLP
    assert base.best.recovered == base.best.samples == 2 and base.best.false_certificates == 0
    noisy = next(r for label, r in rows.items() if label.startswith("gaussian-noise"))
    assert noisy.best.recovered == 0  # noise of std 0.5 on a clipped update: nothing exact
    assert noisy.utility.epsilon is not None and 0 < noisy.utility.epsilon < float("inf")
    assert base.utility.epsilon is None
    topk = next(r for label, r in rows.items() if label.startswith("top-k"))
    assert topk.bytes_ratio < 0.05  # 1% of the entries as (index, value) pairs
    assert 0 <= base.utility.accuracy <= 1 and base.time_ratio == 1.0
    assert all(c.false_certificates == 0 for c in ev.cells if isinstance(c, LeakageCell))
    assert set(ev.pareto) <= set(rows)
    results, report = write_evaluation(ev, tmp_path)
    payload = json.loads(results.read_text())
    assert payload["seed"] == 0 and payload["environment"]["packages"]["torch"]
    assert len(payload["cells"]) == 2 * len(rows)  # one utility and one leakage cell per setting (one attack)
    assert "data:image/png;base64" in report.read_text()


def test_an_interrupted_evaluation_resumes_from_its_finished_cells(tmp_path):
    settings = EvaluationSettings(**SMALL, defenses=("top-k:ratio=0.1", "mixup:k=2"))
    first = evaluate(settings, out=tmp_path)
    # cells are named by the setting as given (MixUp's number of classes, filled from the data, is not in it)
    assert {c.defense for c in first.cells} == {s.label for s in settings.grid()}
    cells = tmp_path / "cells.jsonl"
    lines = cells.read_text().splitlines()
    cells.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # the last cell cut short
    again = evaluate(settings, out=tmp_path)
    assert again.resumed == len(first.cells) - 1  # every complete cell reused, the broken one recomputed
    def measured(cells):  # everything but the time taken (NaN compared as text)
        return [json.dumps({k: v for k, v in c.to_dict().items() if k not in ("seconds", "client_seconds")})
                for c in cells]

    assert measured(again.cells) == measured(first.cells)
    wider = evaluate(EvaluationSettings(**SMALL, defenses=("top-k:ratio=0.1", "mixup:k=2", "sign:scale=mean")),
                     out=tmp_path)
    assert wider.resumed == len(first.cells) and len(wider.cells) == len(first.cells) + 2  # the grid extended
    with pytest.raises(OutputError, match="other settings"):
        evaluate(EvaluationSettings(**{**SMALL, "rounds": 5}, defenses=("top-k:ratio=0.1", "mixup:k=2")), out=tmp_path)


def _row(name, leak, acc):
    cell = LeakageCell(name, "a", 10, 0, int(10 * leak), 20.0, 0.5, 1.0, 0, 0.1, False)
    util = UtilityCell(name, acc, 0.5, 1.0, 100.0)
    return DefenseRow(name, (cell,), util, util)


def test_pareto_front_keeps_only_undominated_settings():
    rows = [_row("none", 1.0, 0.9), _row("a", 0.5, 0.9), _row("b", 0.5, 0.8), _row("c", 0.0, 0.5)]
    assert pareto_front(rows) == ["a", "c"]


def test_cli_evaluate_writes_results_and_rejects_a_bad_defense_in_one_line(tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["evaluate", "--data", "digits", "--test-data", "none", "--test-size", "300", "--widths", "64",
            "--attack", "exclusivity",
            "--attack-batch", "2", "--trials", "1", "--rounds", "2", "--clients", "2", "--client-size", "50",
            "--batch-size", "8", "--out", str(out), "--quiet"]
    assert main([*args, "--defense", "sign"]) == 0
    assert json.loads((out / "results.json").read_text())["kind"] == "fedleak-evaluation"
    assert "sign" in capsys.readouterr().out
    code = main([*args, "--defense", "qsgd:levels=0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "levels" in err and "Traceback" not in err


def test_the_test_data_follows_the_training_data():
    """A built-in training set is tested on its own test split; any other data set on samples held out of it
    (the default used to test every data set on Fashion-MNIST, and refused any other shape)."""
    from fedleak.evaluation.settings import EvaluationSettings

    assert EvaluationSettings().test_data == "fashion-mnist"
    assert EvaluationSettings(data="lfw").test_data is None
    assert EvaluationSettings(data="lfw", test_data="lfw-faces").test_data == "lfw-faces"



@pytest.mark.parametrize("data,test,client", [("lfw", 80, 80), ("digits", 359, 359)])
def test_unset_sizes_fit_the_data(data, test, client):
    """Left unset, the test set and the clients' shares fit the data (a data set of a few hundred samples, such
    as LFW, was refused: 4 clients x 500 and 2000 test samples); the run records what it used."""
    tiny = dict(widths=(16,), defenses=(), attacks=("exclusivity",), attack_batch=1, trials=1, rounds=1)
    result = evaluate(EvaluationSettings(data=data, **tiny))
    assert (result.test_size, result.client_size) == (test, client)
    assert result.to_dict()["test_size"] == test and result.to_dict()["settings"]["client_size"] is None
    assert (evaluate(EvaluationSettings(widths=(16,), rounds=1, defenses=(), attacks=("exclusivity",), attack_batch=1,
                                        trials=1)).client_size == 500)  # Fashion-MNIST's training split: 4 x 500


def test_sizes_too_large_for_the_data_say_what_the_defaults_do():
    with pytest.raises(FedleakError, match=r"lfw has 400 samples: too few for 4 clients x 500.*left unset"):
        evaluate(EvaluationSettings(data="lfw", client_size=500, widths=(16,)))
    with pytest.raises(FedleakError, match="too few for test_size=20000"):
        evaluate(EvaluationSettings(test_size=20000, widths=(16,)))


def test_an_attack_that_cannot_read_the_model_says_so_instead_of_a_silent_zero(capsys):
    """A GELU model: the exclusivity attack gives up on every batch; the evaluation says so (and why) next to the
    table, where its 'exact' column alone would read 0%. The first-layer attack certifies the one-sample batches."""
    from user_models import GeluMLP

    settings = EvaluationSettings(data="digits", test_data=None, test_size=100, widths=(16,), defenses=(),
                                  attacks=("exclusivity", "first-layer"), attack_batch=1, trials=2, rounds=1,
                                  clients=2, client_size=50, batch_size=8)
    result = evaluate(settings, model=GeluMLP(64, 64, 10))
    assert result.problems() == ("exclusivity: no result on 2 of 2 attacked batches (node 'gelu' "
                                 "(torch._C._nn.gelu): not supported; " + result.problems()[0].split("; ", 1)[1],)
    first = next(c for c in result.cells if isinstance(c, LeakageCell) and c.attack == "first-layer")
    assert first.recovered == 2 and not first.errors and first.false_certificates == 0


def test_auto_draws_no_progress_bar_of_its_own_and_takes_the_clients_defense(capsys):
    """``auto`` in an evaluation: the evaluation's progress is the only one (nothing on stderr without it), and a
    defense the exact route can undo (per-layer clipping) reaches its exact route when the attack is told it; not
    told, the exact route reads it off the layers' equal norms (before, it certified nothing)."""
    settings = EvaluationSettings(data="digits", test_data=None, test_size=100, widths=(128,),
                                  defenses=("clipping:bound=0.01",), attacks=("auto",), attack_batch=2, trials=1,
                                  rounds=1, clients=2, client_size=50, batch_size=8, attack_iterations=5,
                                  client_mode="eval")
    result = evaluate(settings)
    assert "auto:" not in capsys.readouterr().err
    cells = {(c.defense, c.attack): c for c in result.cells if isinstance(c, LeakageCell)}
    told, blind = cells[("clipping(bound=0.01)", "auto (defense-aware)")], cells[("clipping(bound=0.01)", "auto")]
    assert told.recovered == 2 == blind.recovered and told.false_certificates == 0 == blind.false_certificates


def test_a_model_that_fits_several_image_sizes_is_attacked_at_the_data_s():
    """A stride-2 convolution fits 25 x 25 and 26 x 26 images; the evaluation's attacks read the data's 25 x 25 (they
    inferred 26 x 26, and the scoring stopped the run)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 13 * 13, 256), nn.ReLU(), nn.Linear(256, 1))
    result = evaluate(EvaluationSettings(data="lfw", widths=(16,), defenses=(), attacks=("exclusivity",),
                                         attack_batch=2, trials=1, rounds=1), model=model)
    row = result.to_dict()["rows"][0]
    assert row["per_attack"]["exclusivity"]["recovered_fraction"] > 0


def test_clients_that_train_with_label_smoothing_are_evaluated_so(tmp_path):
    """The clients' steps are of the loss given, and the exact attack, told, certifies them: told a smoothing a
    plain cross-entropy's gradient does not have, it certifies none of it (the control below)."""
    told = evaluate(EvaluationSettings(**SMALL, defenses=(), label_smoothing=0.1), out=tmp_path / "told")
    base = {r.defense: r for r in told.rows}["none"]
    assert base.best.recovered == base.best.samples == 2 and base.best.false_certificates == 0
    assert told.settings.to_dict()["label_smoothing"] == 0.1
    import torch

    import fedleak

    torch.manual_seed(0)
    model = fedleak.make_mlp((1, 8, 8), [128], 10)
    x, y = fedleak.load_dataset("digits").batch(2, seed=0)
    plain = fedleak.GradientUpdate(fedleak.compute_gradient_update(model, x, y).gradients, num_examples=2)
    assert fedleak.reconstruct(model, plain, label_smoothing=0.1).num_certified == 0


@pytest.mark.parametrize("bad, message", [
    ({"label_smoothing": 0.1, "defenses": ("dp-sgd",)}, "plain cross-entropy"),
    ({"focal_gamma": 2.0, "label_smoothing": 0.1}, "focal"),
])
def test_a_client_loss_the_evaluation_cannot_carry_is_refused(bad, message):
    with pytest.raises(FedleakError, match=message):
        EvaluationSettings(**{**SMALL, **bad})
