"""SGD's weight decay in a one-step weight update: read off the units no sample activated, with a proven interval,
peeled with a noise bound that holds on every entry, and the attack certifies what it certifies without decay."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak import metrics
from fedleak.attacks.exact.decay import peel_decay, read_decay
from fedleak.attacks.exact.noise import step_noises
from fedleak.nets import as_network
from fedleak.update_kind import describe_update

LR, M = 0.05, 8


def one_step(model, x, y, weight_decay, bias_decay=None):
    """A client's one local step of SGD with momentum (its first step: the same as without) and weight decay."""
    local = copy.deepcopy(model)
    weights = [p for n, p in local.named_parameters() if p.dim() > 1]
    biases = [p for n, p in local.named_parameters() if p.dim() == 1]
    decay_b = weight_decay if bias_decay is None else bias_decay
    opt = torch.optim.SGD([{"params": weights, "weight_decay": weight_decay},
                           {"params": biases, "weight_decay": decay_b}], lr=LR, momentum=0.9)
    opt.zero_grad()
    F.cross_entropy(local(x), y).backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: p.detach().clone() for n, p in local.named_parameters()}
    return fedleak.WeightUpdate(before, after, num_examples=len(y))


@pytest.fixture(scope="module")
def setting(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(M, seed=0)
    return model, x, y


def test_the_decay_is_read_within_its_interval_and_peeled_within_its_noise(setting):
    model, x, y = setting
    update = one_step(model, x, y, 5e-4)
    delta = update.delta()
    decay = read_decay(as_network(model), update.before, delta, step_noises(update.after, delta))
    assert decay.found and decay.units > 10
    assert decay.weight.lo <= LR * 5e-4 <= decay.weight.hi and decay.bias.lo <= LR * 5e-4 <= decay.bias.hi
    assert decay.weight.bound < 1e-3 * LR * 5e-4
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    peeled, noise = peel_decay(decay, update.before, delta, step_noises(update.after, delta))
    for (name, _), g in zip(model.named_parameters(), grads):
        err = (peeled[name].double() - LR * g.double()).abs()
        assert (err <= noise[name].whole()).all(), name  # every entry within its bound


def test_no_decay_and_undecayed_biases(setting):
    model, x, y = setting
    plain = one_step(model, x, y, 0.0)
    delta = plain.delta()
    assert read_decay(as_network(model), plain.before, delta, step_noises(plain.after, delta)) is None  # silent
    weights_only = one_step(model, x, y, 5e-4, bias_decay=0.0)
    decay = read_decay(as_network(model), weights_only.before, weights_only.delta(),
                       step_noises(weights_only.after, weights_only.delta()))
    assert decay.found and decay.bias.value == 0.0


@pytest.mark.parametrize("bias_decay", [None, 0.0])
def test_the_attack_certifies_through_the_decay(setting, bias_decay):
    model, x, y = setting
    plain = fedleak.reconstruct(model, one_step(model, x, y, 0.0))
    decayed = fedleak.reconstruct(model, one_step(model, x, y, 5e-4, bias_decay))
    scores = metrics.match(decayed, x, y)
    assert not scores.false_certificate.any()
    # a sample at the edge of exact may drop out: undecayed biases keep a bound of half an ulp on their factor, and
    # the decay's peel moves rows that read almost the same input apart (their rival rows then leave it uncertain)
    assert decayed.num_certified >= plain.num_certified - 1 >= M // 2
    assert any("weight decay read off" in note for note in decayed.notes)
    kind = describe_update(one_step(model, x, y, 1e-2), model)
    assert kind.weight_decay and not kind.noised and "SGD weight decay" in kind.summary()


def test_layers_decayed_differently_certify_nothing_wrong(setting):
    # the decay is read at the last ReLU layer; a first layer decayed otherwise is left in the update
    model, x, y = setting
    local = copy.deepcopy(model)
    params = list(local.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "weight_decay": 5e-2}, {"params": params[2:], "weight_decay": 5e-4}],
                          lr=LR)
    opt.zero_grad()
    F.cross_entropy(local(x), y).backward()
    opt.step()
    update = fedleak.WeightUpdate({n: p.detach().clone() for n, p in model.named_parameters()},
                                  {n: p.detach().clone() for n, p in local.named_parameters()}, num_examples=M)
    rec = fedleak.reconstruct(model, update)
    assert not metrics.match(rec, x, y).false_certificate.any()


def test_a_simulated_client_with_weight_decay(setting):
    model, x, y = setting
    plain = fedleak.reconstruct(model, fedleak.fedavg_update(model, x, y, lr=LR, optimizer="momentum"))
    decayed = fedleak.fedavg_update(model, x, y, lr=LR, optimizer="momentum", weight_decay=5e-4)
    rec = fedleak.reconstruct(model, decayed)
    assert not metrics.match(rec, x, y).false_certificate.any()
    assert rec.num_certified >= plain.num_certified - 1 >= M // 2  # one at the edge of exact may drop out (above)
    with pytest.raises(fedleak.FedleakError, match="weight_decay"):
        fedleak.fedavg_update(model, x, y, lr=LR, weight_decay=-1.0)
