"""fedleak.evaluate with FedAvg clients: several local steps of the clients' optimizer, and a server that reads the
weights they send back (the evaluation's clients took one plain SGD step, and weight attacks found no update)."""

import pytest
import torch

from fedleak.cli import main
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.evaluation import EvaluationSettings, evaluate
from fedleak.evaluation.cells import LeakageCell
from fedleak.evaluation.federation import prepare_federation
from fedleak.evaluation.leakage import client_updates
from fedleak.model_copy import copy_model
from fedleak.updates import GradientUpdate, WeightUpdate

SMALL = dict(data="digits", test_data=None, test_size=300, widths=(128,), attack_batch=2, trials=1, rounds=3,
             clients=2, client_size=100, batch_size=8, client_mode="eval")


def test_an_attacked_fedavg_client_trains_as_torch_s_sgd_with_momentum_and_weight_decay():
    """The weights the server reads are those ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` reaches on the
    client's three batches, which the trial holds in order (the attack is scored on all of them)."""
    settings = EvaluationSettings(**SMALL, local_steps=3, momentum=0.9, weight_decay=5e-4, lr=0.05)
    fed = prepare_federation(settings, None)
    (trial,) = client_updates(settings, fed, DefenseStack(()))
    assert isinstance(trial.update, WeightUpdate) and trial.update.num_examples == 6 == len(trial.x)
    assert trial.update.learning_rate == 0.05
    client = copy_model(fed.model).eval()  # the same model, trained by torch's own optimizer
    opt = torch.optim.SGD(client.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for xb, yb in zip(trial.x.split(2), trial.y.split(2)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(client(xb), yb).backward()
        opt.step()
    for name, p in client.state_dict().items():
        torch.testing.assert_close(trial.update.after[name], p, rtol=0, atol=1e-6)


def test_a_one_step_client_is_read_alike_as_a_delta_and_as_weights():
    """One step: the server that reads the change (divided by the rate it set, or at an unknown scale) and the one
    that reads the FedAvg reply, with the rate or without it (one step's rate cancels), certify the same samples,
    none falsely."""
    counts = {}
    for upload, known in (("delta", True), ("delta", False), ("weights", True), ("weights", False)):
        settings = EvaluationSettings(**SMALL, defenses=(), attacks=("exclusivity",), upload=upload, lr_known=known)
        assert settings.upload == upload
        (trial,) = client_updates(settings, prepare_federation(settings, None), DefenseStack(()))
        assert isinstance(trial.update, GradientUpdate if upload == "delta" else WeightUpdate)
        assert upload == "delta" or trial.update.learning_rate == (0.1 if known else None)
        cell = next(c for c in evaluate(settings).cells if isinstance(c, LeakageCell))
        counts[upload, known] = (cell.recovered, cell.false_certificates)
    assert set(counts.values()) == {(2, 0)}


def test_fedavg_clients_are_evaluated_under_weight_attacks_and_their_steps_are_accounted():
    """Three local steps with momentum: DLM+ (weights only) now runs on every attacked client, the cells count the
    samples of all three steps, and DP-SGD's epsilon grows with the steps taken."""
    settings = EvaluationSettings(**SMALL, local_steps=3, momentum=0.9, attacks=("dlm+", "exclusivity"),
                                  defenses=("dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0",), attack_iterations=20)
    result = evaluate(settings)
    assert settings.upload == "weights" and result.to_dict()["settings"]["local_steps"] == 3
    assert not result.problems()  # no attack refused the update
    leakage = [c for c in result.cells if isinstance(c, LeakageCell)]
    assert all(c.samples == 6 and c.false_certificates == 0 for c in leakage)
    dlm = next(c for c in leakage if c.attack == "dlm+" and c.defense == "none")
    assert dlm.psnr == dlm.psnr  # scored (not NaN): it rebuilt something for every sample
    one = evaluate(EvaluationSettings(**{**SMALL, "rounds": 1}, attacks=("exclusivity",), defenses=settings.defenses))
    three = evaluate(EvaluationSettings(**{**SMALL, "rounds": 1}, local_steps=3, attacks=("exclusivity",),
                                        defenses=settings.defenses))
    assert three.rows[1].utility.epsilon > one.rows[1].utility.epsilon > 0


@pytest.mark.parametrize("bad, message", [
    ({"local_steps": 3, "upload": "delta"}, "upload='weights', or local_steps=1"),
    ({"upload": "gradient"}, "upload must be one of auto, delta, weights"),
    ({"optimizer": "adam", "momentum": 0.9}, "Adam keeps its own moments"),
    ({"optimizer": "rmsprop"}, "rmsprop"),
    ({"local_steps": 0}, "local_steps must be at least 1"),
])
def test_client_training_that_cannot_be_evaluated_is_refused_with_the_reason(bad, message):
    with pytest.raises(FedleakError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvaluationSettings(**{**SMALL, **bad})


def test_cli_evaluates_fedavg_clients_and_names_its_options_in_a_refusal(tmp_path, capsys):
    args = ["evaluate", "--data", "digits", "--test-data", "none", "--test-size", "300", "--widths", "64",
            "--attack", "exclusivity", "--attack-batch", "2", "--trials", "1", "--rounds", "2", "--clients", "2",
            "--client-size", "50", "--batch-size", "8", "--defense", "none", "--quiet"]
    assert main([*args, "--local-steps", "2", "--momentum", "0.9", "--out", str(tmp_path / "ev")]) == 0
    assert "2 steps of sgd (momentum 0.9) on 8 samples at lr 0.1" in (tmp_path / "ev" / "report.html").read_text()
    capsys.readouterr()
    code = main([*args, "--local-steps", "2", "--upload", "delta", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--upload weights, or --local-steps 1" in err
    assert not (tmp_path / "no").exists()


def test_the_global_model_averages_the_clients_batchnorm_statistics_and_is_tested_in_eval_mode(monkeypatch):
    """As Flower's FedAvg averages every array a client returns, the server takes the mean of the clients' running
    statistics (they stayed at their initial values: a BatchNorm model was tested against mean 0 and variance 1),
    each client moving them once per local step, and tests the model in eval mode (a user's module came in
    training mode, its Dropout active at test time)."""
    import fedleak.evaluation.run as run
    from fedleak.defenses.stack import DefenseStack as Stack

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
    seen = {}

    def spy(net, x):
        seen.update(training=net.training, stats={k: v.clone() for k, v in net.state_dict().items() if "running" in k
                                                  or "tracked" in k})
        return predictions(net, x)

    predictions = run.model_predictions
    monkeypatch.setattr(run, "model_predictions", spy)
    settings = EvaluationSettings(**{**SMALL, "client_mode": "train"}, local_steps=2, attacks=("exclusivity",),
                                  defenses=())
    fed = prepare_federation(settings, model)
    run.train_federation(settings, fed, Stack(()))
    assert seen["training"] is False and model.training  # tested in eval mode; the user's module left as it was
    assert int(seen["stats"]["2.num_batches_tracked"]) == settings.rounds * settings.local_steps
    assert not torch.allclose(seen["stats"]["2.running_mean"], torch.zeros(32))
    assert not torch.allclose(seen["stats"]["2.running_var"], torch.ones(32))
