"""Two-class labels rest on the sign of the update's factor: an update read with an unknown factor (a weight change
new - old passed as a gradient is minus the learning rate times it) certifies no label its negative explains with
the other label."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.attacks.label_sign import flipped_factors, shared_factor


def two_class(seed: int = 0, d: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 2))


def batch(m: int, seed: int = 1, d: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, d, generator=g), torch.arange(m) % 2


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1) -> dict[str, torch.Tensor]:
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    opt.zero_grad()
    F.cross_entropy(local(x), y).backward()
    opt.step()
    return {n: p.detach() for n, p in local.named_parameters()}


def test_shared_factor_reads_counts_within_the_batch():
    assert shared_factor(np.array([0.3]), 1) == pytest.approx(0.3)
    assert shared_factor(np.array([0.2, 0.4]), 3) == pytest.approx(0.2)  # counts 1 and 2
    assert shared_factor(np.array([0.2, 0.4]), 2) is None  # 1 + 2 samples: more than the batch holds
    assert shared_factor(np.array([0.2, 0.3]), 5) == pytest.approx(0.1)  # counts 2 and 3
    assert shared_factor(np.array([0.2, 0.3]), 4) is None
    assert shared_factor(np.array([0.2, -0.3]), 64) is None  # no positive reading takes the second sample


def test_a_known_magnitude_takes_only_its_multiples():
    assert shared_factor(np.array([0.25, 0.5]), 4, magnitude=0.25) == pytest.approx(0.25)  # counts 1 and 2
    assert shared_factor(np.array([0.25, 0.4]), 4, magnitude=0.25) is None  # 0.4 is no whole multiple of it
    assert shared_factor(np.array([0.2, 0.3]), 5) == pytest.approx(0.1)  # the same factors, magnitude unknown
    assert shared_factor(np.array([0.2, 0.3]), 5, magnitude=0.25) is None


def test_an_unsigned_change_at_the_rate_the_server_set_certifies_no_label_of_even_odds(lfw):
    """A change read from the model's weights, its sign unread (two classes), divided by the rate the server set:
    its factor's size is pinned (``1/M``), its sign not. A sample the model gives even odds sits at that size with
    either label, one per sign: the version before certified the other label (found by the certificate hunt: 1 of
    68 certificates on retina patches, a pseudo-gradient of a batch of 6). Here every sample's odds are even to
    1e-4 (output layer scaled by 1e-4; lr 1000 for rows above the rounding of the weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(625, 1024), nn.ReLU(), nn.Linear(1024, 2))
    with torch.no_grad():
        model[3].weight.mul_(1e-4)
        model[3].bias.zero_()
    x, y = lfw.batch(4, seed=1)
    delta = fedleak.fedavg_update(model, x, y, lr=1000.0, local_steps=1).delta()  # old - new
    unproven = 0  # samples whose input is exact and whose label the sign leaves open (which of the two signs
    for change in (dict(delta), {k: -v for k, v in delta.items()}):  # has them depends on the CPU's rounding)
        update = fedleak.read_update(model, change, num_examples=4, kind="change")
        rec = fedleak.reconstruct(model, update, attack="exclusivity", learning_rate=1000.0)
        assert fedleak.metrics.match(rec, x, y).false_certificates == 0 and rec.num_certified == 0
        unproven += sum("label unproven" in route for route in rec.routes)
    assert unproven


def test_flipped_factor_is_the_other_labels_scale():
    model = two_class()
    x, y = batch(1)
    f = flipped_factors(model, x, y, np.array([1.0]))
    g = fedleak.compute_gradient_update(model, x, y).gradients
    other = fedleak.compute_gradient_update(model, x, 1 - y).gradients
    for name in g:  # the negated gradient is f times the other label's
        torch.testing.assert_close(-g[name], float(f[0]) * other[name], rtol=1e-4, atol=1e-7)
    assert flipped_factors(nn.Sequential(nn.Linear(48, 3)), x, y, np.array([1.0])) is None


@pytest.mark.parametrize("attack", ["exclusivity", "first-layer", "auto"])
def test_a_negated_one_sample_update_certifies_no_label(attack):
    model = two_class()
    x, y = batch(1)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    negated = {n: -0.1 * g for n, g in grads.items()}  # as a weight change new - old of one SGD step reads
    rec = fedleak.reconstruct(model, negated, attack=attack, num_examples=1)
    assert rec.num_certified == 0
    assert "label is not proven" in rec.why_uncertified()
    assert torch.allclose(rec.inputs[0].reshape(-1), x[0], atol=1e-4)  # the input is read all the same
    # the gradient itself, and the weights after the step, still certify the sample with its label
    for update in (fedleak.compute_gradient_update(model, x, y), step(model, x, y)):
        rec = fedleak.reconstruct(model, update, attack="exclusivity", num_examples=1)
        assert rec.num_certified == 1 and int(rec.labels[0]) == int(y[0])


def test_imprint_certifies_no_label_of_a_negated_batch():
    data = fedleak.load_dataset("lfw")  # two classes; before this check, both samples certified with the other label
    X, Y = data.x.flatten(1).float(), data.y
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(X.shape[1], 256), nn.ReLU(), nn.Linear(256, 2))
    model = fedleak.imprint_weights(net, X[-100:], seed=0)
    idx = torch.randperm(len(X) - 100, generator=torch.Generator().manual_seed(11))[:2]
    x, y = X[idx], Y[idx]
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    rec = fedleak.reconstruct(model, {n: -g for n, g in grads.items()}, attack="imprint", num_examples=2)
    assert rec.num_certified == 0 and "label is not proven" in rec.why_uncertified()
    rec = fedleak.reconstruct(model, grads, attack="imprint", num_examples=2)  # the gradient: labels as they are
    assert rec.num_certified == 2
    for i in range(2):
        assert int(rec.labels[i]) == int(y[int((x - rec.inputs[i].reshape(1, -1)).abs().amax(1).argmin())])


def test_ten_classes_are_not_affected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = batch(1)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="first-layer")
    assert rec.num_certified == 1 and int(rec.labels[0]) == int(y[0])


def test_a_one_logit_model_is_read_as_its_two_class_twin(lfw):
    """Binary cross-entropy on one logit: its gradient is the two-class twin's, and so is the sign's ambiguity (the
    version before certified every negated one-sample gradient with the wrong label)."""
    X, Y = lfw.x.flatten(1).float(), lfw.y
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(X.shape[1], 256), nn.ReLU(), nn.Linear(256, 1))
    x, y = X[5:6], Y[5:6]
    loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y.float())
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    told = fedleak.reconstruct(model, grads, attack="exclusivity", num_examples=1)
    assert told.num_certified == 1 and int(told.labels[0]) == int(y[0])
    negated = fedleak.reconstruct(model, {n: -g for n, g in grads.items()}, attack="exclusivity", num_examples=1)
    assert negated.num_certified == 0 and "label is not proven" in negated.why_uncertified()
