"""`fedleak audit --membership`: membership attacks on a target trained on real data, through the command line."""

import json
import math

import pytest

from fedleak.cli import main

FLOWER_NET = '''
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
'''


def _audit(tmp_path, *args):
    return main(["audit", "--membership", "--out", str(tmp_path / "out"), "--quiet", *args])


def test_overfit_target_leaks_membership_and_the_report_shows_the_roc(tmp_path, capsys):
    # digits, 100 members trained 40 epochs: train accuracy well above test accuracy
    code = _audit(tmp_path, "--members", "100", "--non-members", "200", "--widths", "128", "--epochs", "40",
                  "--train-batch", "25", "--membership-attacks", "loss,confidence", "--seed", "3")
    console = capsys.readouterr().out
    assert code == 0
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["seed"] == 3 and payload["settings"]["members"] == 100
    assert payload["environment"]["packages"]["torch"].startswith("2.13")
    (plain,) = payload["scenarios"]
    assert plain["name"] == "plain" and plain["epsilon"] is None
    assert plain["train_accuracy"] - plain["test_accuracy"] > 0.03
    loss = next(a for a in plain["attacks"] if a["name"] == "loss")
    assert loss["members"] == 100 and loss["non_members"] == 200
    assert loss["auc"] > 0.56  # about 4 standard errors above chance at 100 / 200 records
    assert [a["name"] for a in plain["attacks"]] == ["loss", "confidence"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "TPR @ 1% FPR" in page
    assert f"{loss['auc']:.3f}" in page
    assert f"loss                   AUC {loss['auc']:.3f}" in console and "gap" in console


def test_dp_sgd_records_epsilon_beside_the_auc(tmp_path, capsys):
    code = _audit(tmp_path, "--members", "60", "--non-members", "60", "--widths", "32", "--epochs", "3",
                  "--train-batch", "20", "--membership-attacks", "loss",
                  "--defense", "dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0")
    console = capsys.readouterr().out
    assert code == 0
    plain, dp = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"]
    assert plain["epsilon"] is None and plain["privacy"] == []
    assert dp["defense"] == "dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0"
    assert math.isfinite(dp["epsilon"]) and dp["epsilon"] > 0 and 0.0 <= dp["attacks"][0]["auc"] <= 1.0
    assert f"ε {dp['epsilon']:.3g}" in console
    assert f"ε {dp['epsilon']:.3g}" in (tmp_path / "out" / "report.html").read_text()


def test_attacks_with_options_are_named_by_what_they_change(tmp_path, capsys):
    """``augmented-loss:padding=1,flip=false`` is one attack with two options, next to the same attack at its
    defaults: each scored, each named in the results and on the console by its label."""
    code = _audit(tmp_path, "--members", "60", "--non-members", "60", "--widths", "32", "--epochs", "3",
                  "--train-batch", "20", "--membership-attacks", "loss,augmented-loss:padding=1,flip=false,"
                  "augmented-loss")
    console = capsys.readouterr().out
    assert code == 0
    (plain,) = json.loads((tmp_path / "out" / "results.json").read_text())["scenarios"]
    names = [a["name"] for a in plain["attacks"]]
    assert names == ["loss", "augmented-loss(padding=1, flip=False)", "augmented-loss"]
    assert plain["attacks"][1]["params"] == {"padding": 1, "flip": False, "fill": None}
    assert "augmented-loss(padding=1, flip=False) AUC" in console


@pytest.mark.parametrize(("args", "message"), [
    (["--membership-attacks", "loss,bogus"], "unknown membership attack 'bogus'"),
    (["--membership-attacks", "augmented-loss:padding=x"], "membership attack 'augmented-loss': parameter padding"),
    (["--membership-attacks", "augmented-loss:pad=1"], "membership attack 'augmented-loss' has no parameter 'pad'"),
    (["--membership-attacks", "loss,loss"], "membership attack(s) ['loss'] given twice"),
    (["--defense", "no-such-defense"], "no-such-defense"),
    (["--conv", "6"], "drop --conv"),
    (["--members", "1500", "--non-members", "500"], "ask for fewer (members=1347, non_members=449 fit)"),
    (["--membership-attacks", "lira", "--reference", "1"], "reference"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    assert _audit(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_users_flower_net_is_trained_and_attacked(tmp_path, capsys):
    (tmp_path / "net.py").write_text(FLOWER_NET)
    code = _audit(tmp_path, "--data", "retina", "--model", f"{tmp_path / 'net.py'}:Net", "--members", "40",
                  "--non-members", "40", "--epochs", "2", "--train-batch", "20",
                  "--membership-attacks", "loss,update-alignment")
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["model"].endswith("net.py:Net")
    (plain,) = payload["scenarios"]
    assert 0.0 <= plain["train_accuracy"] <= 1.0 and [a["members"] for a in plain["attacks"]] == [40, 40]
    assert all(0.0 <= a["auc"] <= 1.0 for a in plain["attacks"])
