"""`fedleak reconstruct` / `fedleak check` on a FedAvg reply as a server stores it: the round's weights and the
client's new weights, as Flower's NDArrays saved with numpy.savez, read against the user's own class."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak.cli import main

NET = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))
'''


def _round(tmp_path, data, net=NET, batch=4, seed=1, steps=1):
    """The user's class in ``net.py``, the round's weights in round.npz and a client's reply after ``steps`` SGD
    steps at lr 0.1 on a batch of ``data`` in reply.npz, as a server stores them: (x, y, the round's model)."""
    (tmp_path / "net.py").write_text(net)
    model = fedleak.load_model(f"{tmp_path / 'net.py'}:Net", seed=0).module
    x, y = data.batch(batch, seed=seed)
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(client(x), y).backward()
        opt.step()
    np.savez(tmp_path / "round.npz", *[v.numpy() for v in model.state_dict().values()])
    np.savez(tmp_path / "reply.npz", *[v.numpy() for v in client.state_dict().values()])
    return x, y, model


def _reconstruct(tmp_path, *extra):
    return main(["reconstruct", "--model", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "round.npz"),
                 "--update", str(tmp_path / "reply.npz"), "--attack", "exclusivity", "--num-examples", "4",
                 "--out", str(tmp_path / "rec"), "--quiet", *extra])


def test_a_stored_reply_is_read_as_weights_and_certified(tmp_path, capsys, digits):
    x, y, _ = _round(tmp_path, digits)
    assert _reconstruct(tmp_path) == 0
    saved = np.load(tmp_path / "rec" / "reconstruction.npz")
    rec_x = torch.from_numpy(saved["x"])[torch.from_numpy(saved["certified"])]
    assert len(rec_x) >= 2
    for r in rec_x:  # every certified sample is one of the batch, exactly
        assert min(float((r.flatten() - s.flatten()).abs().max()) for s in x) < 1e-4
    notes = json.loads((tmp_path / "rec" / "results.json").read_text())["summary"]["notes"]
    assert any("the client's weights" in note for note in notes)


def test_the_reply_read_as_told(tmp_path, capsys, digits):
    _round(tmp_path, digits)
    assert _reconstruct(tmp_path, "--update-kind", "gradient") == 0  # weights read as a gradient: nothing certified
    saved = np.load(tmp_path / "rec" / "reconstruction.npz")
    assert not saved["certified"].any()
    capsys.readouterr()
    assert _reconstruct(tmp_path, "--update-kind", "delta") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error:") and "kind must be one of" in err and err.count("\n") == 1


def test_check_reads_the_reply(tmp_path, capsys, digits):
    _round(tmp_path, digits)
    code = main(["check", "--model", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "round.npz"),
                 "--update", str(tmp_path / "reply.npz")])
    out = capsys.readouterr().out
    assert code == 0 and "FedAvg update" in out and "the client's weights" in out


def test_the_learning_rate_the_server_set(tmp_path, capsys, digits):
    _round(tmp_path, digits)
    assert _reconstruct(tmp_path, "--learning-rate", "0.1") == 0
    results = json.loads((tmp_path / "rec" / "results.json").read_text())
    assert any("learning rate given (0.1)" in note for note in results["summary"]["notes"])
    capsys.readouterr()
    assert _reconstruct(tmp_path, "--learning-rate", "-1") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error: --learning-rate must be a positive number") and err.count("\n") == 1


def test_a_stored_pseudo_gradient_with_the_learning_rate(tmp_path, capsys, digits):
    """A server that stores ``(old - new) / lr`` (a pseudo-gradient): with --learning-rate it is read as the change,
    and certified; a true gradient with --learning-rate fails in one line that names the option."""
    x, _, _ = _round(tmp_path, digits)
    old, new = np.load(tmp_path / "round.npz"), np.load(tmp_path / "reply.npz")
    np.savez(tmp_path / "reply.npz", *[(old[k] - new[k]) / np.float32(0.1) for k in old.files])
    assert _reconstruct(tmp_path, "--learning-rate", "0.1", "--update-kind", "gradient") == 0
    saved = np.load(tmp_path / "rec" / "reconstruction.npz")
    assert saved["certified"].sum() >= 2
    for r in torch.from_numpy(saved["x"])[torch.from_numpy(saved["certified"])]:
        assert min(float((r.flatten() - s.flatten()).abs().max()) for s in x) < 1e-4
    notes = json.loads((tmp_path / "rec" / "results.json").read_text())["summary"]["notes"]
    assert any("divided by the learning rate given" in note for note in notes)
    model = fedleak.load_model(f"{tmp_path / 'net.py'}:Net", seed=0).module
    grads = fedleak.compute_gradient_update(model, *digits.batch(4, seed=1)).gradients
    np.savez(tmp_path / "reply.npz", *[grads[n].numpy() for n, _ in model.named_parameters()])
    capsys.readouterr()
    assert _reconstruct(tmp_path, "--learning-rate", "0.1", "--update-kind", "gradient") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error: --learning-rate is the step size") and err.count("\n") == 1


def test_the_local_steps_the_server_set(tmp_path, capsys, digits):
    """A stored reply of three local steps, declared with --local-steps: read as a multi-step update (the first-layer
    rows, then the search with the steps unrolled), which the results say; a gradient with --local-steps, or a count
    other than the one the update carries, fails in one line that names the option."""
    x, y, model = _round(tmp_path, digits, steps=3)
    code = main(["reconstruct", "--model", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "round.npz"),
                 "--update", str(tmp_path / "reply.npz"), "--num-examples", "4", "--local-steps", "3",
                 "--budget", "3", "--out", str(tmp_path / "rec"), "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "rec" / "results.json").read_text())
    assert results["settings"]["options"]["local_steps"] == 3  # recorded with the run
    notes = results["summary"]["notes"]
    assert "auto: multi-step FedAvg update: 4 examples in 3 local steps" in notes
    assert any("exact route skipped: the client took 3 local steps" in note for note in notes)
    saved = np.load(tmp_path / "rec" / "reconstruction.npz")
    for r in torch.from_numpy(saved["x"]):  # the first-layer rows give the inputs, exactly (uncertified)
        assert min(float((r.flatten() - s.flatten()).abs().max()) for s in x) < 1e-4
    capsys.readouterr()
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    np.savez(tmp_path / "reply.npz", *[grads[n].numpy() for n, _ in model.named_parameters()])
    assert _reconstruct(tmp_path, "--local-steps", "3", "--update-kind", "gradient") == 2
    err = capsys.readouterr().err
    assert err.startswith("fedleak: error: --local-steps is a fact of a FedAvg client") and err.count("\n") == 1
    update = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=3, reveal_local_steps=True)
    with pytest.raises(fedleak.FedleakError, match=r"carries local_steps 3, but local_steps=1"):
        fedleak.reconstruct(model, update, local_steps=1)


def test_check_takes_what_the_server_knows_of_a_two_class_reply(tmp_path, capsys, lfw):
    """`fedleak check` on a two-class reply says to pass the learning rate, and takes it (and the count and steps),
    as `fedleak reconstruct` does."""
    two = NET.replace("nn.Linear(64, 1024)", "nn.Linear(625, 1024)").replace("(1024, 10)", "(1024, 2)")  # LFW
    _, _, model = _round(tmp_path, lfw, net=two, batch=8, seed=0)
    base = ["check", "--model", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "round.npz"),
            "--update", str(tmp_path / "reply.npz"), "--num-examples", "8"]
    assert main(base) == 0
    assert "pass --learning-rate, the rate the server set" in capsys.readouterr().out
    assert main([*base, "--learning-rate", "0.1", "--local-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "pass --learning-rate" not in out and "1 local step at learning rate 0.1" in out
    with pytest.raises(fedleak.FedleakError, match="pass the update too"):
        fedleak.plan(model, None, learning_rate=0.1)


def test_a_class_fishing_servers_reply(tmp_path, capsys, digits):
    """The server sent its class-fished model (class 3) and set the rate and the one local step: with them, every
    sample of class 3 in the stored reply is certified, exactly; without them, one line names the options."""
    (tmp_path / "net.py").write_text(NET)
    model = fedleak.class_fishing_weights(fedleak.load_model(f"{tmp_path / 'net.py'}:Net", seed=0).module, 3)
    x, y = digits.batch(32, seed=2)
    client = copy.deepcopy(model)
    F.cross_entropy(client(x), y).backward()
    torch.optim.SGD(client.parameters(), lr=0.1).step()
    np.savez(tmp_path / "round.npz", *[v.numpy() for v in model.state_dict().values()])
    np.savez(tmp_path / "reply.npz", *[v.detach().numpy() for v in client.state_dict().values()])
    args = ["reconstruct", "--model", f"{tmp_path / 'net.py'}:Net", "--weights", str(tmp_path / "round.npz"),
            "--update", str(tmp_path / "reply.npz"), "--attack", "class-fishing", "--num-examples", "32",
            "--out", str(tmp_path / "rec"), "--quiet"]
    assert main([*args, "--learning-rate", "0.1", "--local-steps", "1"]) == 0
    saved = np.load(tmp_path / "rec" / "reconstruction.npz")
    rec_x = torch.from_numpy(saved["x"])[torch.from_numpy(saved["certified"])]
    assert len(rec_x) == int((y == 3).sum()) > 0
    for r in rec_x:
        assert min(float((r.flatten() - s.flatten()).abs().max()) for s in x[y == 3]) < 1e-4
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "give --learning-rate=lr and --local-steps 1 with the update" in err and err.count("\n") == 1
