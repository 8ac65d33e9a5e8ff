"""Class fishing: a malicious output layer that silences every class but one, and the attack that counts the
target class's samples off the first layer, certified exactly, with no false certificate."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak.attacks.malicious.class_fishing import MARGIN, fished_class
from fedleak.nets import as_network
from tests.user_models import DropoutMLP


def _attack(model, update, data_range=(0.0, 1.0)):
    return fedleak.reconstruct(model, update, attack="class-fishing", data_range=data_range)


def test_the_fished_layer_silences_every_other_class_for_any_input_in_range(digits):
    base = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    fished = fedleak.class_fishing_weights(base, 4)
    W, b = fished[3].weight.detach(), fished[3].bias.detach()
    assert torch.equal(base[1].weight, fished[1].weight) and not torch.equal(base[3].weight, W)  # a copy
    assert float(W[4].min()) == float(W[4].max()) == 2.0 and float(torch.cat([W[:4], W[5:]]).abs().max()) == 0.0
    assert fished_class(as_network(fished).head, (0.0, 1.0)) == (4, 2.0)
    # inputs in the box, each unit's largest among them: the target logit stays the margin below the others
    box = torch.cat([torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                     torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8),
                     (fished[1].weight > 0).float().reshape(-1, 1, 8, 8)])
    logits = fished(box)
    assert float(torch.softmax(logits.double(), 1)[:, 4].max()) < 1e-60
    assert float(torch.cat([b[:4], b[5:]]).min()) >= float(logits[:, 4].max()) + MARGIN


@pytest.mark.parametrize("batch", [64, 256])
def test_every_target_sample_is_certified_exactly_and_no_other(digits, batch):
    """At 256 most target samples share their units with other target samples: peeling the certified ones off
    the rows they open leaves rows of count one for the others."""
    x, y = digits.batch(batch, seed=7)
    fished = fedleak.class_fishing_weights(fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0), 3)
    rec = _attack(fished, fedleak.compute_gradient_update(fished, x, y))
    scores = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    targets = int((y == 3).sum())
    assert rec.certified.all() and len(rec) == targets and set(rec.labels.tolist()) == {3}
    assert round(scores.recovered_fraction * batch) == targets and scores.false_certificates == 0
    assert any(f"holds {targets} sample(s) of the fished class 3" in n for n in rec.notes)
    if batch == 256:
        assert any("certified sample(s) were taken off them" in s.reason for s in rec.samples)


def test_a_one_step_weight_update_at_the_servers_rate(digits):
    x, y = digits.batch(32, seed=1)
    fished = fedleak.class_fishing_weights(fedleak.make_mlp(digits.input_shape, [512], 10, seed=0), 0)
    update = fedleak.fedavg_update(fished, x, y, lr=0.1, local_steps=1)
    rec = _attack(fished, dataclasses.replace(update, learning_rate=0.1, local_steps=1))
    assert int(rec.certified.sum()) == int((y == 0).sum()) > 0
    assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0
    for told in ({}, {"learning_rate": 0.1}, {"learning_rate": 0.1, "local_steps": 2}):
        with pytest.raises(fedleak.UpdateError, match="give learning_rate=lr and local_steps=1 with the update"):
            _attack(fished, dataclasses.replace(update, **told))


def test_a_users_module_on_normalised_faces(lfw):
    """An nn.Module with x.view and F.relu, two-class LFW normalised as users do: the range is the data's as the
    model reads it; the default (0, 1) leaves every input outside the range the margin is proven on."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(625, 1024), nn.Linear(1024, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))

    torch.manual_seed(0)
    x, y = lfw.batch(32, seed=3)
    x = (x - 0.5) / 0.25
    reach = (-2.0, 2.0)
    fished = fedleak.class_fishing_weights(Net(), 1, data_range=reach)
    update = fedleak.compute_gradient_update(fished, x, y)
    rec = _attack(fished, update, reach)
    assert int(rec.certified.sum()) == int((y == 1).sum())
    assert fedleak.metrics.match(rec, x, y, data_range=reach).false_certificates == 0
    assert not _attack(fished, update).certified.any()


def test_what_breaks_the_counts_certifies_nothing(digits):
    """Label smoothing sends every sample into the body, and Dropout in training mode scales what a sample sends: no
    whole counts, nothing certified, said so. Two copies of one target image open the same units: never alone, never
    certified."""
    x, y = digits.batch(32, seed=2)
    fished = fedleak.class_fishing_weights(fedleak.make_mlp(digits.input_shape, [512], 10, seed=0), 5)
    smooth = _attack(fished, fedleak.compute_gradient_update(fished, x, y, label_smoothing=0.1))
    assert not smooth.certified.any() and any("no whole count" in n for n in smooth.notes)
    torch.manual_seed(0)
    dropping = fedleak.class_fishing_weights(DropoutMLP(64, 512, 10), 5)  # built from a model in training mode
    assert dropping.training
    grads = torch.autograd.grad(F.cross_entropy(dropping(x), y), list(dropping.parameters()))
    sent = fedleak.GradientUpdate(dict(zip([n for n, _ in dropping.named_parameters()], grads)), num_examples=32)
    trained = _attack(dropping.eval(), sent)
    assert not trained.certified.any() and any("Dropout in training mode" in n for n in trained.notes)
    first = int(torch.nonzero(y == 5)[0])
    x2, y2 = torch.cat([x, x[first:first + 1]]), torch.cat([y, y[first:first + 1]])
    rec = _attack(fished, fedleak.compute_gradient_update(fished, x2, y2))
    scores = fedleak.metrics.match(rec, x2, y2, data_range=digits.value_range)
    assert scores.false_certificates == 0 and int(rec.certified.sum()) == int((y2 == 5).sum()) - 2


def test_one_sample_read_off_two_rows_is_certified_and_peeled_once(lfw):
    """A near-black face (every pixel times 0.003) read off two rows in one pass: the readings differ by their
    rounding, more than a hundredth of the image's own norm, and within their error bounds. Counted as two samples,
    it was peeled twice and certified twice (found by the certificate hunt); it is one."""
    x, y = lfw.batch(64, seed=0)
    dark = int(torch.nonzero(y == 1)[0])
    x[dark] = x[dark] * 0.003
    fished = fedleak.class_fishing_weights(fedleak.make_mlp(lfw.input_shape, [1000], 2, seed=0), 1, multiplier=3.0)
    update = fedleak.fedavg_update(fished, x, y, lr=0.01, local_steps=1)
    rec = _attack(fished, dataclasses.replace(update, learning_rate=0.01, local_steps=1))
    scores = fedleak.metrics.match(rec, x, y, data_range=lfw.value_range)
    assert scores.false_certificates == 0 and int(rec.certified.sum()) >= 20
    assert scores.recovered[dark]


def test_models_it_cannot_prove_are_refused_by_name(digits):
    x, y = digits.batch(8, seed=0)
    plain = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    with pytest.raises(fedleak.ModelError, match="not class-fished.*class_fishing_weights"):
        _attack(plain, fedleak.compute_gradient_update(plain, x, y))
    deep = fedleak.make_mlp(digits.input_shape, [64, 64], 10, seed=0)
    with pytest.raises(fedleak.ModelError, match="one hidden ReLU layer"):
        fedleak.class_fishing_weights(deep, 0)
    fished = fedleak.class_fishing_weights(plain, 0)
    with pytest.raises(fedleak.ModelError, match=r"the proof needs 110"):
        _attack(fished, fedleak.compute_gradient_update(fished, x, y), (-50.0, 50.0))
    with pytest.raises(fedleak.FedleakError, match="target must"):
        fedleak.class_fishing_weights(plain, 10)
    with pytest.raises(fedleak.UpdateError, match="num_examples"):
        _attack(fished, dict(fedleak.compute_gradient_update(fished, x, y).gradients))


def test_the_plan_recommends_class_fishing_on_a_fished_model_only(digits):
    x, y = digits.batch(16, seed=1)
    plain = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    for model, recommended in ((fedleak.class_fishing_weights(plain, 6), True), (plain, False)):
        advice = next(a for a in fedleak.plan(model, fedleak.compute_gradient_update(model, x, y)).attacks
                      if a.name == "class-fishing")
        assert advice.recommended == recommended and ("class-fished (class 6)" in advice.why) == recommended
