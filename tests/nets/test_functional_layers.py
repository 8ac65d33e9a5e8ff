"""Layers written as functions of the model's own parameters (``F.linear(x, self.w1, self.b1)``,
``F.conv2d(x, self.k, self.c, padding=1)``, as meta-learning code writes models): the exact methods read them as they
read ``nn.Linear`` and ``nn.Conv2d`` modules, and refuse what they cannot read (a computed weight, a weight used
twice, a grouped convolution) saying so."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError
from fedleak.nets import Conv, Dense, as_network


class FunctionalMlp(nn.Module):
    def __init__(self, width: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(width, 64, generator=gen) / 8)
        self.b1 = nn.Parameter(torch.full((width,), 0.01))
        self.w2 = nn.Parameter(torch.randn(10, width, generator=gen) / width**0.5)
        self.b2 = nn.Parameter(torch.zeros(10))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, params=None):  # a meta-learner's forward, traced at its default
        p = params or {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}
        h = F.relu(F.linear(self.drop(x.view(x.size(0), -1)), p["w1"], p["b1"]))
        return F.linear(h, p["w2"], p["b2"])


def twin(f: FunctionalMlp) -> nn.Sequential:
    """The same network with its weights held by nn.Linear layers."""
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, f.w1.shape[0]), nn.ReLU(), nn.Linear(f.w1.shape[0], 10))
    with torch.no_grad():
        for layer, (w, b) in zip((seq[1], seq[3]), ((f.w1, f.b1), (f.w2, f.b2))):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return seq


def test_functional_linear_layers_are_read_live_under_their_parameter_names():
    model = FunctionalMlp()
    net = as_network(model)
    assert [type(st.layer) for st in net.steps].count(Dense) == 2
    assert net.head.parameter_names() == ["w1", "b1", "w2", "b2"] and net.input_shape == (64,)
    with torch.no_grad():
        model.w1.mul_(2)  # an update applied to the model is what the network reads
    assert torch.equal(net.head.dense[0].weight, model.w1) and net.head.dense[0].in_features == 64


@pytest.mark.parametrize("batch", [1, 8])
def test_the_exact_attack_certifies_what_it_certifies_for_the_nn_linear_twin(digits, batch):
    model = FunctionalMlp()
    x, y = digits.batch(batch, seed=5)
    ours = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    theirs = fedleak.reconstruct(twin(model), fedleak.compute_gradient_update(twin(model), x, y))
    assert ours.num_certified == theirs.num_certified >= 1
    assert torch.equal(ours.inputs.flatten(1), theirs.inputs.flatten(1))
    score = fedleak.metrics.match(ours, x, y)
    assert (score.max_abs_error < 1e-5).sum() >= ours.num_certified  # each certified input is a sample, exactly


class Learner(nn.Module):
    """The MAML reference implementation's style: the weights in an nn.ParameterList, indexed in forward."""

    def __init__(self, f: FunctionalMlp) -> None:
        super().__init__()
        self.vars = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in (f.w1, f.b1, f.w2, f.b2)])

    def forward(self, x, vars=None):
        v = self.vars if vars is None else vars
        return F.linear(F.relu(F.linear(x.view(x.size(0), -1), v[0], v[1])), v[2], v[3])


def test_weights_in_a_parameter_list_are_read_under_their_names(digits):
    model = Learner(FunctionalMlp())
    x, y = digits.batch(6, seed=3)
    assert as_network(model).head.parameter_names() == ["vars.0", "vars.1", "vars.2", "vars.3"]
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    twin_rec = fedleak.reconstruct(twin(FunctionalMlp()), fedleak.compute_gradient_update(twin(FunctionalMlp()), x, y))
    assert rec.num_certified == twin_rec.num_certified >= 1
    assert torch.equal(rec.inputs.flatten(1), twin_rec.inputs.flatten(1))


def test_a_dropout_before_the_functional_first_layer_withholds_the_certificates(digits):
    model = FunctionalMlp(dropout=0.2).eval()
    x, y = digits.batch(2, seed=1)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert rec.num_certified == 0 and "Dropout 'drop' (p = 0.2) changes its input" in rec.samples[0].reason
    assert fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), train_dropout=False).num_certified


class Tied(FunctionalMlp):
    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.eye(256))

    def forward(self, x, params=None):
        h = F.relu(F.linear(x.flatten(1), self.w1, self.b1))
        h = F.relu(F.linear(F.relu(F.linear(h, self.w3)), self.w3))  # one weight, two layers
        return F.linear(h, self.w2, self.b2)


class Computed(FunctionalMlp):
    def forward(self, x, params=None):
        h = F.relu(F.linear(x.flatten(1), self.w1, self.b1))
        return F.linear(h, self.w2 * 2, self.b2)  # a weight computed from a parameter


class Transposed(FunctionalMlp):
    def forward(self, x, params=None):  # the first layer's weight read through a view: no layer says the input width
        return F.linear(F.relu(F.linear(x.flatten(1), self.w1.T.T, self.b1)), self.w2, self.b2)


class Convolved(nn.Module):
    """A conv layer of the model's own kernel and bias, with stride and padding given as keywords, then a dense
    head; ``standardise``: the kernel computed (weight standardisation), ``groups``: a grouped convolution."""

    def __init__(self, standardise: bool = False, groups: int = 1, channels: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.k = nn.Parameter(torch.randn(16, channels // groups, 3, 3, generator=gen) / 3)
        self.c = nn.Parameter(torch.full((16,), 0.01))
        self.fc = nn.Linear(16 * 8 * 8, 512)
        self.out = nn.Linear(512, 10)
        self.standardise, self.groups = standardise, groups

    def forward(self, x):
        k = self.k - self.k.mean() if self.standardise else self.k
        h = F.relu(F.conv2d(x, k, self.c, stride=1, padding=1, groups=self.groups))
        return self.out(F.relu(self.fc(h.flatten(1))))


def conv_twin(f: Convolved) -> nn.Sequential:
    """The same network with its kernel held by an nn.Conv2d layer."""
    conv = nn.Conv2d(1, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(f.k)
        conv.bias.copy_(f.c)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), f.fc, nn.ReLU(), f.out)


def test_a_functional_convolution_is_read_live_as_its_nn_conv2d_twin(digits):
    model = Convolved()
    net = as_network(model, input_shape=(1, 8, 8))
    conv = net.blocks[0].conv
    assert isinstance(conv, Conv) and conv.functional and conv.padding == (1, 1) and conv.kernel == (3, 3)
    assert conv.parameter_names() == ["k", "c"]
    with torch.no_grad():
        model.k.mul_(2)  # an update applied to the model is what the network reads
    assert torch.equal(conv.weight(torch.float32), model.k)
    model = Convolved()
    x, y = digits.batch(4, seed=2)
    ours = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), input_shape=(1, 8, 8))
    twin_model = conv_twin(model)
    theirs = fedleak.reconstruct(twin_model, fedleak.compute_gradient_update(twin_model, x, y), input_shape=(1, 8, 8))
    assert ours.num_certified == theirs.num_certified >= 2
    assert torch.allclose(ours.inputs, theirs.inputs, atol=1e-6)
    score = fedleak.metrics.match(ours, x, y, data_range=digits.value_range)
    assert int(score.recovered.sum()) == ours.num_certified and score.false_certificates == 0


@pytest.mark.parametrize("model, match", [
    (Tied(), r"parameter 'w3' is read by more than one layer in forward \(shared weights\)"),
    (Computed(), r"node 'mul' \(operator\.mul\) computes a tensor from the parameter 'w2'.*pass the parameter"),
])
def test_what_cannot_be_read_is_refused_saying_why(model, match):
    with pytest.raises(ModelError, match=match):
        as_network(model)


@pytest.mark.parametrize("model, shape, match", [
    (Convolved(standardise=True), (1, 8, 8), r"computes a tensor from the parameter 'k'"),
    (Convolved(groups=2, channels=2), (2, 8, 8), r"grouped convolutions \(groups=2\)"),
])
def test_a_functional_convolution_it_cannot_read_is_refused_saying_why(model, shape, match):
    with pytest.raises(ModelError, match=match):
        as_network(model, input_shape=shape)


def test_a_weight_read_through_a_view_is_refused_by_name_where_the_input_shape_is_given():
    with pytest.raises(ModelError, match=r"parameters its forward uses through functions.*or pass input_shape="):
        fedleak.nets.input_shape_of(Transposed())
    with pytest.raises(ModelError, match=r"computes a tensor from the parameter 'w1' \(a transpose"):
        as_network(Transposed(), input_shape=(64,))


def test_a_functional_1d_convolution_with_stride_and_padding_certifies_as_its_nn_conv1d_twin():
    class Signals(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.k = nn.Parameter(torch.randn(16, 2, 5, generator=gen) / 3)
            self.c = nn.Parameter(torch.full((16,), 0.01))
            self.fc, self.out = nn.Linear(16 * 32, 512), nn.Linear(512, 4)

        def forward(self, x):
            return self.out(F.relu(self.fc(F.relu(F.conv1d(x, self.k, self.c, stride=2, padding=2)).flatten(1))))

    torch.manual_seed(0)
    model = Signals()
    conv = nn.Conv1d(2, 16, 5, stride=2, padding=2)
    with torch.no_grad():
        conv.weight.copy_(model.k)
        conv.bias.copy_(model.c)
    twin_model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), model.fc, nn.ReLU(), model.out)
    x, y = torch.rand(4, 2, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    ours, theirs = (fedleak.reconstruct(m, fedleak.compute_gradient_update(m, x, y), input_shape=(2, 64))
                    for m in (model, twin_model))
    assert ours.num_certified == theirs.num_certified == 4
    assert torch.allclose(ours.inputs.flatten(1), theirs.inputs.flatten(1), atol=1e-6)
    assert int(fedleak.metrics.match(ours, x, y, data_range=(0.0, 1.0)).recovered.sum()) == 4
