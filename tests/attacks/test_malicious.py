"""Trap-weight and imprint attacks: malicious first layers, certified exact recovery, no false certificates."""

import copy

import numpy as np
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


def two_class_trap(lfw, seed: int) -> torch.nn.Module:
    """A user's two-class MLP on LFW faces (one hidden layer, default init) with trap weights."""
    torch.manual_seed(seed)
    d = int(torch.tensor(lfw.input_shape).prod())
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 2))
    return trap_weights(net, seed=seed)


def test_a_two_class_blend_at_the_batch_scale_is_not_certified(lfw):
    """On a two-class model with one hidden layer a trap row fits a blend of the samples that open it as well as one
    sample: only the batch's scale tells them apart. Here (58 faces, one step at lr 0.1) a blend of 11 faces matched
    the scale to 5e-7 and was certified; the certificate now needs the whole batch."""
    idx = [34, 358, 352, 364, 96, 334, 224, 286, 83, 82, 124, 103, 159, 256, 354, 79, 233, 111, 97, 81, 247, 337, 56,
           178, 193, 301, 98, 234, 222, 155, 395, 214, 146, 59, 336, 319, 223, 29, 114, 4, 148, 282, 53, 90, 239, 137,
           255, 38, 389, 3, 88, 12, 173, 61, 341, 122, 87, 129]
    x, y = lfw.x[idx], lfw.y[idx]
    torch.manual_seed(1324529688)
    d = int(torch.tensor(lfw.input_shape).prod())
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 2))
    model = trap_weights(net, seed=2019507073)
    rec = fedleak.reconstruct(model, fedleak.fedavg_update(model, x, y, lr=0.1, seed=2019507073),
                              attack="trap-weights")
    m = fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))
    assert int(m.false_certificate.sum()) == 0 and rec.num_certified == 0
    assert any("a blend of samples may match" in s.reason and "do not add up to the update's first layer" in s.reason
               for s in rec.samples)


@pytest.mark.parametrize("seed, certified, peeled", [(1, 4, 0), (0, 3, 0), (9, 3, 1)])
def test_a_two_class_batch_is_certified_when_it_explains_the_whole_first_layer(lfw, seed, certified, peeled):
    """Four faces. Seed 1: each is read alone from a row, and the four add up to every row of the update's first
    layer. Seed 0: one face opens no trap neuron (it adds nothing to the first layer), and the other three add up
    to all of it. Seed 9: one face opens no row alone; subtracting the other three from the rows it shares with
    them reads it, and the four add up to the whole layer (the three read alone are certified)."""
    x, y = lfw.batch(4, seed=seed)
    model = two_class_trap(lfw, seed)
    update = fedleak.fedavg_update(model, x, y, lr=0.1, seed=seed)
    rec = fedleak.reconstruct(model, update, attack="trap-weights")
    m = fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))
    assert int(m.false_certificate.sum()) == 0 and rec.num_certified == certified
    assert int(m.recovered.sum()) == certified
    W = model[1].weight.detach().double()
    silent = ((x.reshape(4, -1).double() @ W.T) > 0).sum(1) == 0
    assert int(silent.sum()) == 4 - certified - peeled
    by = "more read by subtracting them" in rec.samples[0].reason
    assert by == bool(peeled) and "add up to every row of the update's first layer" in rec.samples[0].reason


def test_imprint_counts_its_bins(data, base):
    """Imprint bins carry one number per candidate, which a blend may match by chance: the certificate counts the
    bins. 16 samples in 100 bins share some; every shared bin is refuted as one sample, so the rest are proven
    single. Without the number of examples nothing can be counted, and nothing is certified."""
    model = imprint_weights(base, data.x[-1000:], bins=100, seed=2)
    x, y = data.batch(16, seed=0)
    rec = fedleak.reconstruct(model, one_step(model, x, y), attack="imprint")
    m = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= 10 and int(m.false_certificate.sum()) == 0
    assert any("does not open" in s.reason or "no label explains" in s.reason for s in rec.samples)
    grad = fedleak.compute_gradient_update(model, x, y)
    bare = fedleak.reconstruct(model, dict(grad.gradients), attack="imprint")
    assert bare.num_certified == 0
    assert any("reports no number of examples" in s.reason for s in bare.samples)


def test_a_scale_that_blends_of_two_share_is_refused():
    """60 MNI152 slices (three classes, near-identical neighbours), trap weights, one step at lr 0.1. Blends of two
    near-identical slices fit their rows on every label check and sit at twice ``lr/M``; they outnumbered the true
    samples at ``lr/M``, so that was the voted scale and 10 blends were certified. A voted scale that is a whole
    multiple of a scale others share is now refused."""
    data = fedleak.load_dataset("mni152")
    idx = [22, 329, 332, 247, 109, 162, 143, 201, 237, 65, 198, 200, 122, 147, 387, 267, 300, 380, 173, 168, 77, 211,
           189, 49, 312, 263, 374, 394, 45, 54, 397, 308, 343, 157, 196, 19, 353, 26, 307, 288, 172, 134, 159, 324, 214,
           274, 194, 209, 258, 295, 293, 229, 47, 347, 230, 176, 218, 299, 178, 18]
    x, y = data.x[idx], data.y[idx]
    torch.manual_seed(782131106)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 3))
    model = trap_weights(net, seed=1092411825)
    rec = fedleak.reconstruct(model, fedleak.fedavg_update(model, x, y, lr=0.1, seed=798302648),
                              attack="trap-weights")
    m = fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))
    assert int(m.false_certificate.sum()) == 0 and rec.num_certified == 0
    assert any("2 times a scale that others share" in s.reason for s in rec.samples)


def test_counting_proof_counts_only_bins_that_hold_a_sample():
    """Counting: with E = M - N shared bins, exactly E refuted candidates prove the rest single. A candidate read
    from an empty bin's rounding is refuted too, but holds no sample: counting it would let a shared bin pass."""
    from fedleak.attacks.malicious.proofs import BinCount, counting_proof

    refuted = np.array([True, True, False, False, False])  # the first from an empty bin, the second a shared one
    standing = ~refuted  # three candidates sit at the batch's scale
    empty_first = (False, True, True, True, True)
    assert counting_proof(refuted, standing, BinCount(nonempty=8, strays=0, filled=(True,) * 5), 10).holds
    assert counting_proof(refuted, standing, BinCount(nonempty=9, strays=0, filled=empty_first), 10).holds
    two_shared = counting_proof(refuted, standing, BinCount(nonempty=8, strays=0, filled=empty_first), 10)
    assert not two_shared.holds and "2 bin(s) hold several, and 1 are refuted" in two_shared.why
    few = counting_proof(refuted, standing, BinCount(nonempty=7, strays=0, filled=(True,) * 5), 10)
    assert not few.holds and "only 3 candidate(s) sit at the batch's scale" in few.why
    assert not counting_proof(refuted, standing, BinCount(9, 0, (True,) * 5), None).holds


def test_blends_of_near_copies_stand_only_at_a_pinned_scale(digits):
    """Four digits and a copy of each moved by noise of 1e-3 of the range: a trap row opened by a pair gives its blend
    at twice a sample's scale, and the four blends voted for that scale: trap weights certified them (4 false
    certificates of a gradient with its size, of one without, and of a one-step change at an untold rate). A vote
    that falls on the update's own scale is pinned (``1/M``; ``lr/M`` at the rate the server set): distinct samples
    keep their certificates there."""
    model = trap_weights(fedleak.make_mlp(digits.input_shape, [256], 10, seed=3), seed=3)
    x, y = digits.batch(4, seed=3)
    noise = 1e-3 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1)
    xb, yb = torch.cat([x, (x + noise).clamp(0, 1)]), torch.cat([y, y])
    gradient = fedleak.compute_gradient_update(model, xb, yb)
    updates = (gradient, dict(gradient.gradients), fedleak.fedavg_update(model, xb, yb, lr=0.1, local_steps=1),
               fedleak.fedavg_update(model, xb, yb, lr=0.1, local_steps=1, reveal_learning_rate=True))
    for update in updates:
        rec = fedleak.reconstruct(model, update, attack="trap-weights")
        assert rec.num_certified == 0 and fedleak.metrics.match(rec, xb, yb).false_certificates == 0
    assert "near-copies" in fedleak.reconstruct(model, gradient, attack="trap-weights").why_uncertified()
    x, y = digits.batch(8, seed=4)
    for update in (fedleak.compute_gradient_update(model, x, y),
                   fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1, reveal_learning_rate=True)):
        rec = fedleak.reconstruct(model, update, attack="trap-weights")
        assert rec.num_certified >= 1 and fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_an_update_whose_first_layer_did_not_move_returns_nothing_saying_why(digits):
    """No trap neuron opened (a frozen first layer, or none of the batch's samples opens one): the attack crashed on
    its empty set of candidates (a reshape of 0 elements); it returns none, and says why."""
    model = trap_weights(fedleak.make_mlp(digits.input_shape, [64], 10, seed=0), seed=0)
    x, y = digits.batch(4, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    silent = {k: torch.zeros_like(v) if k.startswith("1.") else v for k, v in grads.items()}
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(silent, num_examples=4), attack="trap-weights")
    assert len(rec) == 0 and "no trap neuron was opened" in rec.why_uncertified()
