import pytest
import torch
from torch import nn

import fedleak
from fedleak.models import as_relu_mlp, parse_sequential


def test_make_mlp_shapes_and_names():
    model = fedleak.make_mlp((1, 8, 8), [32, 16], 10, seed=3)
    net = as_relu_mlp(model)
    assert net.depth == 2 and net.widths == (32, 16) and net.input_dim == 64 and net.num_classes == 10
    assert net.input_shape == (1, 8, 8)
    assert net.parameter_names() == [n for n, _ in model.named_parameters()]
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)


def test_make_mlp_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = fedleak.make_mlp(64, [8], 3, seed=1)
    after = torch.rand(1)
    b = fedleak.make_mlp(64, [8], 3, seed=1)
    c = fedleak.make_mlp(64, [8], 3, seed=2)
    assert torch.equal(before, after)
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


def test_bias_free_and_nested_user_sequential():
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU()), nn.Linear(5, 3, bias=False))
    net = as_relu_mlp(model)
    assert net.depth == 1 and not net.has_all_biases
    assert net.dense[0].weight_name == "0.0.weight" and net.dense[0].bias_name is None


@pytest.mark.parametrize(
    "model, fragment",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "'1' (Tanh) is not supported"),
        (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "expected a ReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "must end with a Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 2)), "takes 5 inputs"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(4, 2)), "Conv2d"),
        (nn.Linear(4, 2), "nn.Sequential"),
    ],
)
def test_unsupported_models_are_refused_with_the_layer_named(model, fragment):
    with pytest.raises(fedleak.ModelError, match=None) as info:
        as_relu_mlp(model)
    assert fragment in str(info.value)
    assert isinstance(info.value, fedleak.FedleakError) and isinstance(info.value, ValueError)


def test_parse_rejects_flatten_after_linear():
    with pytest.raises(fedleak.ModelError, match="Flatten after a Linear"):
        parse_sequential(nn.Sequential(nn.Linear(4, 4), nn.Flatten(), nn.ReLU(), nn.Linear(4, 2)))


def test_input_shape_must_match_first_layer():
    with pytest.raises(fedleak.ModelError, match="input shape"):
        as_relu_mlp(nn.Sequential(nn.Linear(10, 3)), input_shape=(1, 3, 3))


def test_make_mlp_rejects_bad_arguments():
    with pytest.raises(fedleak.ModelError):
        fedleak.make_mlp(10, [0], 3)
    with pytest.raises(fedleak.ModelError):
        fedleak.make_mlp(10, [4], 1)
