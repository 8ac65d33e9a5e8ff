"""Dropout on the model's input: no attack that reads the input certifies it unless the client ran in eval mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak import metrics

WITHHELD = "changes its input in training mode"


class InputDropoutMLP(nn.Module):
    """A user's MLP whose Dropout masks the input itself (as in denoising or input-noise training)."""

    def __init__(self, d: int, hidden: int, classes: int, p: float = 0.2):
        super().__init__()
        self.drop, self.fc1, self.fc2 = nn.Dropout(p), nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.drop(x.view(x.size(0), -1)))))


class InputDropoutCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout2d(0.1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        h = F.relu(self.conv(self.drop(x)))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def _client(model, x, y, train: bool, seed: int = 1):
    torch.manual_seed(seed)
    update = fedleak.compute_gradient_update(model.train(train), x, y)
    model.eval()
    return update


@pytest.mark.parametrize("attack, m", [("exclusivity", 8), ("first-layer", 1)])
def test_a_masked_input_is_never_certified(fashion, attack, m):
    """In training mode the update is exactly the eval-mode gradient of the masked input: before, both attacks
    certified that masked copy (every certificate false). Now nothing is certified, the masked copy is still
    returned, and the reason says why; told eval mode, a training-mode update certifies nothing true either."""
    torch.manual_seed(0)
    model = InputDropoutMLP(784, 1024, 10)
    x, y = fashion.batch(m, seed=1)
    update = _client(model, x, y, train=True)
    rec = fedleak.reconstruct(model, update, attack=attack)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and scores.false_certificates == 0 and len(rec) >= 1
    assert all(WITHHELD in s.reason for s in rec.samples)
    # the rebuilt input is the masked copy: zero where the client's Dropout dropped a value
    assert (rec.inputs.reshape(len(rec), -1) == 0).float().mean() > (x == 0).float().mean()


def test_the_rows_of_a_masked_input_say_so(fashion):
    """A batch's first-layer rows, of a gradient or of a weight change of several steps, agree on what the client's
    layer read: a masked copy of the input, or over several steps a blend of copies masked anew at every step.
    Neither is the input; each sample's reason says why."""
    torch.manual_seed(0)
    model = InputDropoutMLP(784, 1024, 10)
    x, y = fashion.batch(8, seed=1)
    for update in (_client(model, x, y, train=True), fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=3)):
        rec = fedleak.reconstruct(model.eval(), update, attack="first-layer")
        assert len(rec) >= 4 and all(WITHHELD in s.reason for s in rec.samples)
        assert metrics.match(rec, x, y).exact.sum() == 0  # copies, not the inputs


def test_told_eval_mode_certifies_as_before(fashion, digits):
    torch.manual_seed(0)
    model = InputDropoutMLP(784, 1024, 10)
    x, y = fashion.batch(8, seed=1)
    update = _client(model, x, y, train=False)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert rec.num_certified == 0 and any(WITHHELD in n for n in rec.notes)
    told = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=False)
    scores = metrics.match(told, x, y)
    assert told.num_certified >= 6 and scores.recovered.sum() == told.num_certified
    one = _client(model, x[:1], y[:1], train=False)
    assert fedleak.reconstruct(model, one, attack="first-layer", train_dropout=False).num_certified == 1
    cnn = InputDropoutCNN()
    xd, yd = digits.batch(4, seed=0)
    update = _client(cnn, xd, yd, train=False)
    assert fedleak.reconstruct(cnn, update, attack="exclusivity").num_certified == 0
    told = fedleak.reconstruct(cnn, update, attack="exclusivity", train_dropout=False)
    assert told.num_certified >= 1 and metrics.match(told, xd, yd).false_certificates == 0


def test_trap_weights_on_a_masked_input(fashion):
    torch.manual_seed(0)
    model = fedleak.trap_weights(InputDropoutMLP(784, 1024, 10).eval(), seed=1)
    x, y = fashion.batch(8, seed=2)
    rec = fedleak.reconstruct(model, _client(model, x, y, train=True), attack="trap-weights")
    assert rec.num_certified == 0 and metrics.match(rec, x, y).false_certificates == 0
    assert any(WITHHELD in n for n in rec.notes)
    told = fedleak.reconstruct(model, _client(model, x, y, train=False), attack="trap-weights", train_dropout=False)
    assert told.num_certified >= 1 and metrics.match(told, x, y).false_certificates == 0


class NoisyInput(nn.Module):
    """A model that adds noise to its input while it trains."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 1024), nn.Linear(1024, 10)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        if self.training:
            x = x + 0.05 * torch.randn_like(x)
        return self.fc2(F.relu(self.fc1(x)))


def test_input_masking_is_probed_in_training_mode():
    """The probe names a Dropout on the input, sees what no hook or trace sees (noise added in training mode only),
    and finds nothing for a Dropout after the first layer; the model stays as it was."""
    from fedleak.attacks.masked_input import first_reader, input_masking
    from tests.user_models import DropoutMLP

    for model, changed, names in [(InputDropoutMLP(784, 64, 10), True, ["drop"]), (NoisyInput(), True, []),
                                  (DropoutMLP(784, 64, 10), False, [])]:
        model.eval()
        net = fedleak.nets.as_network(model)
        state = torch.random.get_rng_state()
        masking = input_masking(model, first_reader(net), net.input_shape)
        assert masking.changed == changed and [d.name for d in masking.dropout] == names
        assert not model.training and torch.equal(torch.random.get_rng_state(), state)


def test_noise_added_in_training_mode_certifies_nothing(fashion):
    """A model that adds noise to its input in training mode (an ``if self.training`` branch the eval-mode trace
    never sees): the update is the gradient of the noisy input, which the exclusivity attack certified (8 of 8, all
    false) before it probed the model in training mode."""
    torch.manual_seed(0)
    model = NoisyInput()
    x, y = fashion.batch(8, seed=1)
    update = _client(model, x, y, train=True)
    for attack, options in [("exclusivity", {}), ("auto", {"budget": 5, "progress": False})]:
        rec = fedleak.reconstruct(model, update, attack=attack, **options)
        assert rec.num_certified == 0 and metrics.match(rec, x, y).false_certificates == 0
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert all(WITHHELD in s.reason for s in rec.samples) and len(rec) == 8


class FunctionalInputDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.dropout(x.flatten(1), 0.3, training=self.training))))


def test_a_functional_dropout_on_the_input_is_seen_too(fashion):
    """The first-layer attack probes the model in training mode (leaving its mode, buffers and random state as they
    were): a functional dropout on the input, which no module hook sees, withholds the certificate too; so does
    the exclusivity attack, which reads the traced graph."""
    torch.manual_seed(0)
    model = FunctionalInputDropout()
    x, y = fashion.batch(1, seed=3)
    update = _client(model, x, y, train=True)
    state = torch.random.get_rng_state()
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert torch.equal(torch.random.get_rng_state(), state) and not model.training
    assert rec.num_certified == 0 and "something the model runs only in training mode" in rec.samples[0].reason
    assert metrics.match(rec, x, y).false_certificates == 0
    assert fedleak.reconstruct(model, update, attack="exclusivity").num_certified == 0
    told = fedleak.reconstruct(model, _client(model, x, y, train=False), attack="first-layer", train_dropout=False)
    assert told.num_certified == 1 and metrics.match(told, x, y).recovered.all()
