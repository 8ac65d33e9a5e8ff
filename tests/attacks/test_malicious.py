"""Trap-weight and imprint attacks: malicious first layers, certified exact recovery, no false certificates."""

import copy

import pytest
import torch

import fedleak
from fedleak.attacks.malicious import imprint_weights, trap_weights
from fedleak.models.convnet import make_convnet
from fedleak.updates import WeightUpdate


@pytest.fixture(scope="module")
def data():
    return fedleak.load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def base(data):
    return fedleak.make_mlp(data.input_shape, [1000], 10, seed=0)


def one_step(model, x, y, lr=0.1):
    """A client's one-step FedAvg update (weights before and after one SGD step)."""
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=lr)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(trained(x), y).backward()
    opt.step()
    return WeightUpdate(model.state_dict(), trained.state_dict(), num_examples=len(x))


def test_trap_weights_shape_signs_and_copy(base):
    trapped = trap_weights(base, seed=1, scale=0.9)
    W = trapped[1].weight.detach()
    assert W.shape == base[1].weight.shape and torch.equal(trapped[3].weight, base[3].weight)
    assert not torch.equal(base[1].weight, W)  # the original is untouched
    neg = (W < 0).sum(1)
    assert int(neg.min()) == W.shape[1] // 2 == int(neg.max())
    # positive half is `scale` times the negative magnitudes: each row sums to -(1-scale) x negative mass
    row_neg = -W.clamp(max=0).sum(1)
    assert torch.allclose(W.sum(1), -(1 - 0.9) * row_neg, rtol=1e-4, atol=1e-6)
    assert float(trapped[1].bias.detach().abs().max()) == 0.0


def test_trap_weights_attack_is_exact_and_certified(data, base):
    x, y = data.batch(16, seed=1)
    trapped = trap_weights(base, seed=3, scale=0.9)
    rec = fedleak.reconstruct(trapped, one_step(trapped, x, y), attack="trap-weights")
    m = fedleak.metrics.match(rec, x, y)
    assert m.recovered_fraction >= 0.5
    assert int(m.false_certificate.sum()) == 0
    assert rec.batch_size == 16


def test_trap_weights_attack_on_a_gradient_with_known_scale(data, base):
    x, y = data.batch(8, seed=2)
    trapped = trap_weights(base, seed=4, scale=0.9)
    grad = fedleak.compute_gradient_update(trapped, x, y)
    rec = fedleak.reconstruct(trapped, grad, attack="trap-weights", known_scale=True)
    m = fedleak.metrics.match(rec, x, y)
    assert m.recovered_fraction >= 0.5 and int(m.false_certificate.sum()) == 0


def test_an_update_sent_as_float64_is_read_as_the_float32_one(data, base):
    """A float32 model's update in float64 carries float32's rounding: the malicious attacks allow for that one,
    as every attack does (fedleak.updates.in_model_dtype), and certify what the float32 update certifies."""
    x, y = data.batch(8, seed=2)
    trapped = trap_weights(base, seed=4, scale=0.9)
    grad = fedleak.compute_gradient_update(trapped, x, y)
    wide = fedleak.GradientUpdate({k: v.double() for k, v in grad.gradients.items()}, num_examples=8)
    runs = [fedleak.reconstruct(trapped, u, attack="trap-weights", known_scale=True) for u in (grad, wide)]
    assert runs[0].num_certified > 0 and runs[1].certified.tolist() == runs[0].certified.tolist()


def test_imprint_weights_bins_and_attack(data, base):
    public = data.x[-1000:]
    model = imprint_weights(base, public, bins=500, seed=2)
    first = model[1]
    assert torch.equal(first.weight[0], first.weight[499]) and not torch.equal(first.weight[0], first.weight[500])
    thresholds = -first.bias[:500].detach()
    assert bool((thresholds[1:] >= thresholds[:-1]).all())
    assert torch.equal(model[3].weight[:, 0], model[3].weight[:, 499])
    x, y = data.batch(32, seed=5)
    rec = fedleak.reconstruct(model, one_step(model, x, y), attack="imprint")
    m = fedleak.metrics.match(rec, x, y)
    assert m.recovered_fraction >= 0.6
    assert int(m.false_certificate.sum()) == 0


def test_a_mixture_is_not_certified(data, base):
    """Several samples in one imprint bin: the bin difference is a mixture and must not be certified."""
    model = imprint_weights(base, data.x[-1000:], bins=2, seed=2)  # 2 bins: at most 2 samples can be alone
    x, y = data.batch(16, seed=6)
    rec = fedleak.reconstruct(model, one_step(model, x, y), attack="imprint")
    m = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified < len(rec)  # the mixture bin was refused
    assert int(m.false_certificate.sum()) == 0 and m.recovered_fraction <= 2 / 16


def test_bad_input(data, base):
    with pytest.raises(fedleak.FedleakError, match="bins"):
        imprint_weights(base, data.x[:100], bins=5000)
    with pytest.raises(fedleak.FedleakError, match="values per sample"):
        imprint_weights(base, torch.rand(10, 5))
    with pytest.raises(fedleak.FedleakError, match="scale"):
        trap_weights(base, scale=1.5)
    with pytest.raises(fedleak.FedleakError, match="no imprint bins"):
        fedleak.reconstruct(base, fedleak.compute_gradient_update(base, *data.batch(4)), attack="imprint")
    with pytest.raises(fedleak.FedleakError, match="unknown option"):
        fedleak.reconstruct(base, fedleak.compute_gradient_update(base, *data.batch(4)), attack="trap-weights",
                            tolerance=1)
    cnn = make_convnet(data.input_shape, 10, channels=(2,), fc_widths=(8,))
    with pytest.raises(fedleak.ModelError, match="starts with conv layer"):
        trap_weights(cnn)


def test_user_module_without_input_shape(data):
    """A user's nn.Module (functional ReLU, x.view), no input shape anywhere: read by fedleak.nets.as_network."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(784, 1000)
            self.fc2 = torch.nn.Linear(1000, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.view(-1, 784))))

    torch.manual_seed(0)
    model = trap_weights(Net(), seed=3, scale=0.9)
    x, y = data.batch(8, seed=1)
    rec = fedleak.reconstruct(model, one_step(model, x, y), attack="trap-weights")
    m = fedleak.metrics.match(rec, x, y)
    assert rec.inputs.shape[1:] == (784,) and m.recovered_fraction >= 0.5 and int(m.false_certificate.sum()) == 0


def test_a_client_training_with_dropout_is_named_in_the_reasons(digits):
    """An imprinted model with Dropout, its client in training mode: nothing certified, and every reason says that
    the client's Dropout may be why (the reasons said only "the rebuilt input does not open the neurons")."""
    from user_models import DropoutMLP

    torch.manual_seed(0)
    model = imprint_weights(DropoutMLP(64, 256, 10, p=0.2).eval(), digits.x[-500:], bins=128, seed=2)
    x, y = digits.batch(8, seed=3)
    rec_eval = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="imprint")
    model.train()
    grad = fedleak.compute_gradient_update(model, x, y)
    model.eval()
    rec = fedleak.reconstruct(model, grad, attack="imprint")
    assert rec_eval.num_certified >= 4 and rec.num_certified == 0
    assert rec.samples and all("Dropout 'dropout' (p = 0.2) in training mode" in s.reason for s in rec.samples)
