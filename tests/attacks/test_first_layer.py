"""The first-layer attack: one sample's gradient gives the sample away in the first Linear layer of any model
(activations, LayerNorm or residual connections after it that the exact route does not read), certified only
when it is one sample's plain gradient of that model."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import DropoutMLP, FlowerNet, GeluMLP, LayerNormMLP, ResidualMLP

import fedleak
from fedleak.errors import FedleakError, ModelError


def _attack(model, x, y, **kwargs):
    return fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="first-layer", **kwargs)


@pytest.mark.parametrize("make", [GeluMLP, ResidualMLP, LayerNormMLP])
def test_one_sample_is_certified_and_exact_through_layers_the_exact_route_cannot_read(make, fashion):
    torch.manual_seed(0)
    model = make().eval()
    x, y = fashion.batch(1, seed=3) if make is GeluMLP else (torch.rand(1, 16), torch.tensor([2]))
    with pytest.raises(FedleakError):
        fedleak.as_network(model)  # not a network the exclusivity attack reads
    rec = _attack(model, x, y)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 1 and rec.labels.tolist() == y.tolist()
    assert scores.recovered_fraction == 1.0 and float(scores.max_abs_error[0]) < 1e-6
    assert rec.samples[0].residual < 1e-5 and rec.samples[0].route == "first-layer (certified)"


def test_what_is_not_one_plain_gradient_is_not_certified(fashion):
    """Two samples (each row a sum of both), an unknown count, a sign-compressed gradient (whose rows all give
    sign(x), one consistent but wrong input) and a model computing with Dropout active: no certificate."""
    torch.manual_seed(0)
    model = GeluMLP().eval()
    x2, y2 = fashion.batch(2, seed=4)
    rec = _attack(model, x2, y2)  # GELU: every unit carries both samples, no two rows agree
    assert rec.num_certified == 0 and len(rec) == 0 and "no two rows" in rec.missing_reason
    x, y = fashion.batch(1, seed=3)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, dict(update.gradients), attack="first-layer")
    assert rec.num_certified == 0 and "num_examples=1" in rec.samples[0].reason
    signed = fedleak.defended_gradient(model, x, y, "sign", seed=0).update
    rec = fedleak.reconstruct(model, signed, attack="first-layer")
    assert rec.num_certified == 0 and "relative residual" in rec.samples[0].reason
    dropout = DropoutMLP(784, 256, 10).train()
    rec = _attack(dropout, x, y)
    assert rec.num_certified == 0 and "not one plain gradient" in rec.samples[0].reason
    assert not fedleak.metrics.match(rec, x, y).false_certificate.any()


class Before(nn.Module):
    """``pre`` of the sample, flattened, then a ReLU MLP: what the first Linear layer reads is ``pre(x)``."""

    def __init__(self, pre) -> None:
        super().__init__()
        self.pre = pre
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.pre(x).flatten(1))))


def _rescaled(x):
    if x.max() > 1:  # raw 0..16 digits: control flow on the values
        x = x / 16
    return x


# each gives another sample the same first-layer input, and is the identity on a probe in [0, 1)
MANY_TO_ONE = {"clamp": lambda x: x.clamp(0, 1), "relu": torch.relu, "abs": torch.abs, "branch": _rescaled}


@pytest.mark.parametrize("pre", list(MANY_TO_ONE.values()), ids=list(MANY_TO_ONE))
def test_a_sample_changed_before_the_first_layer_is_not_certified(digits, pre):
    """The rebuilt values are what the layer read; the client's sample (raw 0..16, or centred to [-1, 1]) is
    another one that gives the same, so the gradient at the rebuilt values reproduces the update all the same."""
    torch.manual_seed(0)
    model = Before(pre).eval()
    x, y = digits.batch(1, seed=3)
    x = x * 16 if pre is _rescaled else 2 * x - 1
    for attack in ("first-layer", "auto"):
        update = fedleak.compute_gradient_update(model, x, y)
        rec = fedleak.reconstruct(model, update, attack=attack, **({"budget": 0.5} if attack == "auto" else {}))
        scores = fedleak.metrics.match(rec, x, y, data_range=(float(x.min()), float(x.max())))
        assert rec.num_certified == 0 and scores.false_certificates == 0
        assert "not certified as the client's sample" in rec.samples[0].reason or attack == "auto"


@pytest.mark.parametrize("pre", [nn.Identity(), nn.Dropout(0.3).eval(), lambda x: x.float().contiguous(),
                                 lambda x: x.view(len(x), 1, 8, 8)], ids=["Identity", "Dropout", "cast", "view"])
def test_ops_that_pass_the_sample_on_as_it_is_still_certify(digits, pre):
    torch.manual_seed(0)
    model = Before(pre).eval()
    x, y = digits.batch(1, seed=3)
    rec = _attack(model, x, y, train_dropout=False)
    assert rec.num_certified == 1 and fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_models_whose_input_does_not_enter_a_linear_layer_are_refused(fashion):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ModelError, match="reads the sample as it is"):
        _attack(FlowerNet(), x, torch.tensor([1]))
    shared = nn.Sequential(nn.Flatten(), nn.Linear(784, 784), nn.Tanh())
    shared.append(shared[1]).append(nn.Linear(784, 10))  # the first Linear runs twice
    with pytest.raises(ModelError, match="runs more than once"):
        _attack(shared, *fashion.batch(1, seed=0))
    frozen = GeluMLP()
    frozen.fc1.requires_grad_(False)
    with pytest.raises(ModelError, match="frozen on the client"):
        _attack(frozen, *fashion.batch(1, seed=0))
    with pytest.raises(FedleakError, match="unknown first-layer option"):
        _attack(GeluMLP(), *fashion.batch(1, seed=0), iterations=3)


def test_auto_takes_the_first_layer_where_the_exact_route_cannot_read_the_model(fashion):
    """A one-sample gradient of a model the exclusivity attack refuses: auto certifies it from the first layer
    instead of handing it to IG; of two samples, IG as before."""
    torch.manual_seed(0)
    model = GeluMLP().eval()
    x, y = fashion.batch(1, seed=3)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="auto", progress=False)
    assert rec.attack == "auto:first-layer" and rec.num_certified == 1
    assert fedleak.metrics.match(rec, x, y).recovered_fraction == 1.0
    x2, y2 = fashion.batch(2, seed=4)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x2, y2), attack="auto", progress=False,
                              iterations=2)
    assert rec.attack == "auto:ig" and rec.num_certified == 0


def test_the_users_model_is_left_as_it_was(fashion):
    """The attack runs the model several times; its buffers (here a counter of forward passes, as BatchNorm's
    statistics in training mode) are as they were after it."""

    class Counting(GeluMLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("passes", torch.zeros(()))

        def forward(self, x):
            self.passes += 1
            return super().forward(x)

    torch.manual_seed(0)
    model = Counting()
    x, y = fashion.batch(1, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="first-layer", input_shape=(1, 28, 28))
    assert rec.num_certified == 1 and float(model.passes) == 1.0
    model.fc1 = nn.Sequential(nn.Linear(784, 64), nn.BatchNorm1d(64))  # training mode: one sample cannot pass
    model.fc2 = nn.Linear(64, 10)
    with pytest.raises(ModelError, match="Expected more than 1 value per channel when training"):
        fedleak.reconstruct(model, fedleak.compute_gradient_update(model, *fashion.batch(2, seed=0)),
                            attack="first-layer", input_shape=(1, 28, 28))


@pytest.mark.parametrize("fraction", [0.9, 0.3, 0.01])
def test_a_gradient_clipped_by_value_still_certifies_its_one_sample(fashion, fraction):
    """``clip_grad_value_`` cuts the largest entries (at 0.9 of the top, one unit's only, which no value shows): the
    input is read off a row none of whose entries reach the bound, and the model's gradient there, clipped alike,
    reproduces the update. Before, the whole-update check failed and nothing was certified."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 256, 10).eval()
    x, y = fashion.batch(1, seed=5)
    update = fedleak.compute_gradient_update(model, x, y)
    bound = fraction * max(float(g.abs().max()) for g in update.gradients.values())
    grads = {n: g.clamp(-bound, bound) for n, g in update.gradients.items()}
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=1), attack="first-layer")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 1 and rec.labels.tolist() == y.tolist()
    assert float(scores.max_abs_error[0]) < 1e-6 and not scores.false_certificate.any()
    assert any("clip_grad_value_" in n for n in rec.notes)


def test_a_batch_clipped_by_value_leaves_out_the_rows_at_the_bound(fashion):
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10).eval()
    x, y = fashion.batch(4, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    grads = {n: g.clamp(-1e-3, 1e-3) for n, g in update.gradients.items()}
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=4), attack="first-layer")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 0 and len(rec) >= 3
    assert float(scores.max_abs_error[scores.matched >= 0].max()) < 1e-5  # every input it gives is a sample's
    assert all("clip_grad_value_" in s.reason and "holding an entry at it were left out" in s.reason
               for s in rec.samples)


def test_a_negated_gradient_is_read_and_said(fashion):
    """A weight change new - old passed as a gradient is the gradient's negative: one sample is still certified (its
    input is the row over its bias entry whatever the sign), and a batch the attacks rebuild nothing of says what
    the update reads as."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 256, 10).eval()
    x, y = fashion.batch(1, seed=5)
    update = fedleak.compute_gradient_update(model, x, y)
    negated = fedleak.GradientUpdate({n: -g for n, g in update.gradients.items()}, num_examples=1)
    rec = fedleak.reconstruct(model, negated, attack="first-layer")
    assert rec.num_certified == 1 and rec.labels.tolist() == y.tolist() and rec.samples[0].scale < 0
    assert float(fedleak.metrics.match(rec, x, y).max_abs_error[0]) < 1e-6
    assert any("the gradient's negative" in n for n in rec.notes)
    x, y = fashion.batch(4, seed=5)
    update = fedleak.compute_gradient_update(model, x, y)
    negated = fedleak.GradientUpdate({n: -g for n, g in update.gradients.items()}, num_examples=4)
    for attack in ("exclusivity", "first-layer"):
        rec = fedleak.reconstruct(model, negated, attack=attack)
        assert len(rec) == 0 and "reads as the negative of a cross-entropy gradient" in rec.why_uncertified()
    assert "negative of a cross-entropy gradient" not in fedleak.reconstruct(model, update).why_uncertified()


class FunctionalGelu(nn.Module):
    """A GELU network that holds its weights as parameters and applies them with F.linear (meta-learning style)."""

    def __init__(self, drop: float = 0.0, clamp: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(256, 784, generator=gen) / 28)
        self.b1 = nn.Parameter(torch.zeros(256))
        self.w2 = nn.Parameter(torch.randn(10, 256, generator=gen) / 16)
        self.b2 = nn.Parameter(torch.zeros(10))
        self.drop, self.clamp = drop, clamp

    def forward(self, x):
        h = x.view(x.size(0), -1)
        h = F.dropout(h.clamp(0, 1) if self.clamp else h, self.drop, self.training)
        return F.linear(F.gelu(F.linear(h, self.w1, self.b1)), self.w2, self.b2)


def test_a_functional_first_layer_is_read_by_its_weight(fashion):
    """F.linear of the model's parameters: certified and exact as the module's is; a functional dropout or a clamp
    before it withholds the certificate, naming the layer by its weight."""
    x, y = fashion.batch(1, seed=3)
    rec = _attack(FunctionalGelu().eval(), x, y)
    assert rec.num_certified == 1 and float((rec.inputs.flatten() - x.flatten()).abs().max()) < 1e-6
    dropped = _attack(FunctionalGelu(drop=0.2).eval(), x, y)
    assert dropped.num_certified == 0 and "a functional dropout" in dropped.samples[0].reason
    clamped = _attack(FunctionalGelu(clamp=True).eval(), x, y)
    assert clamped.num_certified == 0 and "before 'w1' reads it" in clamped.samples[0].reason
