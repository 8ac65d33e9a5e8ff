"""`fedleak federate --model file.py:Class`: a federation of the user's own model class on Flower's simulation
engine, its clients training it as training loops do (model.train()) or in eval mode."""

import dataclasses
import json

import pytest

from fedleak.cli import main
from fedleak.errors import FedleakError, ModelError
from fedleak.federation.client import check_before_start
from fedleak.federation.settings import FederationSettings, data_split, make_model

pytest.importorskip("flwr")

NET = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(torch.flatten(x, 1)))))


class Plain(nn.Module):  # Net without its Dropout
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class Conv(nn.Module):  # no hidden dense ReLU: nothing for the exact attack, nor for trap weights
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class Binary(nn.Module):  # one logit, trained with binary cross-entropy
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(625, 1024)
        self.fc2 = nn.Linear(1024, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class Normed(nn.Module):  # BatchNorm: Opacus (DP-SGD) cannot give it per-sample gradients
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc1 = nn.Linear(2 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.bn(self.conv(x))), 1))))


class WeightNormed(nn.Module):  # every Linear layer under weight normalisation (its module does not pickle)
    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(64, 512))
        self.fc2 = nn.utils.parametrizations.weight_norm(nn.Linear(512, 10))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class Three(Net):
    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(512, 3)
'''


@pytest.fixture()
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    return path


def _federate(tmp_path, ray_cluster, net_file, mode):
    out = tmp_path / f"run-{mode}"
    code = main(["federate", "--model", f"{net_file}:Net", "--data", "digits", "--clients", "2", "--rounds", "1",
                 "--batch-size", "4", "--test-size", "200", "--public-size", "100", "--client-mode", mode,
                 "--ray-address", ray_cluster[0], "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_a_federation_of_the_users_model(tmp_path, ray_cluster, net_file):
    evaluated = _federate(tmp_path, ray_cluster, net_file, "eval")
    assert evaluated["settings"]["model"] == f"{net_file}:Net" and evaluated["settings"]["hidden"] == []
    recs = evaluated["records"]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["false_certificates"] == 0 for r in recs)
    assert sum(r["recovered_fraction"] for r in recs) > 0  # eval-mode clients: Dropout is the identity
    trained = _federate(tmp_path, ray_cluster, net_file, "train")
    recs = trained["records"]
    assert all(r["status"] == "ok" and r["recovered_fraction"] == 0 and r["false_certificates"] == 0 for r in recs)
    assert all("Dropout 'drop'" in r["reason"] for r in recs)  # the reason names what the clients did
    # read as a training-mode client's, the exclusive rows still give the inputs: rebuilt exactly, uncertified
    assert all(r["rebuilt"] > 0 and r["psnr_vs_original"] >= 80 for r in recs)


def test_a_federation_of_a_model_with_weight_normalisation(tmp_path, ray_cluster, net_file):
    """The audit worker process gets the model though torch pickles no parametrized module, and the exact route reads
    the clients' one-step changes of g and v."""
    out = tmp_path / "normed"
    code = main(["federate", "--model", f"{net_file}:WeightNormed", "--data", "digits", "--clients", "2", "--rounds",
                 "1", "--batch-size", "4", "--test-size", "200", "--public-size", "100", "--ray-address",
                 ray_cluster[0], "--out", str(out)])
    assert code == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["false_certificates"] == 0 for r in recs)
    assert sum(r["recovered_fraction"] for r in recs) > 0


def test_clients_of_several_local_steps_are_read_off_the_first_layer(tmp_path, ray_cluster, net_file):
    """Clients that train 3 local steps send no scaled gradient: nothing is certified, and the audit's ``auto``
    holds the inputs the first Linear layer's rows give, exactly, instead of DLM+'s guesses."""
    out = tmp_path / "steps"
    code = main(["federate", "--model", f"{net_file}:Plain", "--data", "digits", "--clients", "2", "--rounds", "1",
                 "--batch-size", "4", "--local-steps", "3", "--lr", "0.05", "--test-size", "200", "--public-size",
                 "100", "--attack-budget", "3", "--ray-address", ray_cluster[0], "--out", str(out)])
    assert code == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 2 and all(r["status"] == "ok" and r["false_certificates"] == 0 for r in recs)
    assert all(r["multi_step"] and r["route"].startswith("auto:first-layer") for r in recs)
    assert all(r["psnr_vs_original"] >= 80 for r in recs)


def test_a_model_that_does_not_fit_fails_before_anything_starts(tmp_path, net_file, capsys):
    split = data_split("digits", 200, 100)
    with pytest.raises(ModelError, match=r"gives 3 outputs per sample, but the data has 10 classes"):
        make_model(FederationSettings(data="digits", model=f"{net_file}:Three"), split)
    conv = FederationSettings(data="digits", model=f"{net_file}:Conv", test_size=200, public_size=100)
    check_before_start(conv, split)  # an honest server: anything that runs
    with pytest.raises(ModelError, match="trap and imprint weights go into a first Linear layer on the inputs"):
        check_before_start(dataclasses.replace(conv, threat="trap-weights"), split)
    with pytest.raises(ModelError, match="class fishing reads one; this model starts with conv layer"):
        check_before_start(dataclasses.replace(conv, threat="class-fishing"), split)
    with pytest.raises(FedleakError, match="fishing: the model has no hidden ReLU layer in its dense head"):
        check_before_start(dataclasses.replace(conv, threat="fishing"), split)
    normed = dataclasses.replace(conv, model=f"{net_file}:Normed",
                                 defenses=("dp-sgd:noise_multiplier=1,max_grad_norm=1",))
    with pytest.raises(FedleakError, match="cannot compute per-sample gradients .* replace BatchNorm by GroupNorm"):
        check_before_start(normed, split)  # every client would fail in every round
    with pytest.raises(FedleakError, match="weights are the initial weights of a model"):
        FederationSettings(weights="w.pt")
    assert main(["federate", "--model", f"{net_file}:Net", "--widths", "64", "--out", str(tmp_path / "o")]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert main(["federate", "--model", f"{net_file}:Three", "--data", "digits", "--test-size", "200",
                 "--public-size", "100", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error: model") and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_a_relative_model_file_is_kept_absolute(tmp_path, net_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = FederationSettings(model="net.py:Net", data="digits")
    assert settings.model == f"{net_file.resolve()}:Net"
    assert FederationSettings.from_json(settings.to_json()) == settings
    assert FederationSettings(model="flower-cnn").model == "flower-cnn"


def test_a_federation_of_a_binary_classifier_on_data_sorted_by_class(tmp_path, ray_cluster, net_file):
    """One logit on LFW (faces first, then non-faces): the clients train it with binary cross-entropy, the audit
    attacks its two-class twin, and the test set holds both classes."""
    split = data_split("lfw", 50, 50)
    assert set(split.test_y.tolist()) == {0, 1} and set(split.train_y.tolist()) == {0, 1}
    tail = data_split("digits", 200, 100)  # interleaved classes: the last samples are the test set, as they were
    assert set(tail.test_y.tolist()) == set(range(10))
    out = tmp_path / "binary"
    assert main(["federate", "--model", f"{net_file}:Binary", "--data", "lfw", "--clients", "2", "--rounds", "1",
                 "--batch-size", "8", "--test-size", "50", "--public-size", "50", "--ray-address", ray_cluster[0],
                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    recs = result["records"]
    assert all(r["status"] == "ok" and r["false_certificates"] == 0 for r in recs)
    assert sum(r["recovered_fraction"] for r in recs) > 0
    assert all(0 < r["test_accuracy"] < 1 for r in result["rounds"])
