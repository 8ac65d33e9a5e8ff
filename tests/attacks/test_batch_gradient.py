"""The whole-batch gradient of the CNN certificate and of peeling: float64 autograd, the head's dense weights
streamed (no float64 copy of them), equal to plain float64 autograd on models as users write them."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import FlowerNet

from fedleak.attacks.exact.batch_gradient import batch_gradient
from fedleak.nets import as_network


def reference(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain autograd of a float64 copy of the model."""
    m64 = copy.deepcopy(model).double()
    loss = F.cross_entropy(m64(X.double()), y, reduction="sum")
    return dict(zip([n for n, _ in m64.named_parameters()], torch.autograd.grad(loss, list(m64.parameters()))))


def assembled(model: nn.Module, X: torch.Tensor, y: torch.Tensor, net=None):
    params = dict(model.named_parameters())
    out = batch_gradient(model, net or as_network(model), X, y)
    whole = {}
    for name in out.names():
        pieces = list(out.pieces(name, params[name].detach()))
        whole[name] = torch.cat([p for p, _ in pieces]).reshape(params[name].shape)
        assert torch.equal(torch.cat([o for _, o in pieces]).reshape(params[name].shape), params[name].double())
    return out, whole


def test_flower_net_streams_its_dense_weights_and_matches_float64_autograd():
    torch.manual_seed(0)
    model = FlowerNet()
    X, y = torch.rand(5, 3, 32, 32), torch.tensor([0, 3, 3, 7, 9])
    out, whole = assembled(model, X, y)
    assert set(out.sinks) == {"fc1.weight", "fc2.weight", "fc3.weight"}  # no float64 copy of these
    assert not set(out.sinks) & set(out.grads) and all(out.sinks.values())
    ref = reference(model, X, y)
    assert set(whole) == set(ref)
    for name, g in ref.items():
        assert whole[name].dtype == torch.float64
        assert torch.allclose(whole[name], g, rtol=1e-11, atol=1e-14), name


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MatmulMLP(PlainMLP):
    """The same layers, the first one's weight read with a matmul, not F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(x @ self.fc1.weight.T + self.fc1.bias))


def test_a_weight_read_by_matmul_falls_back_to_a_float64_copy():
    torch.manual_seed(1)
    model = MatmulMLP()
    X, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 3, 0, 1])
    out, whole = assembled(model, X, y, net=as_network(PlainMLP(), input_shape=(12,)))
    assert not out.sinks  # the streamed run failed; every weight got a float64 leaf
    for name, g in reference(model, X, y).items():
        assert torch.allclose(whole[name], g, rtol=1e-11, atol=1e-14), name


def test_an_mlp_streams_its_first_layer_whose_input_is_data():
    """The first layer reads no parameter but its own weight: its backward pass runs all the same (else every weight
    fell back to a float64 copy and the batch was computed twice), and the input gets no gradient."""
    torch.manual_seed(2)
    X, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 3, 0, 1])
    for bias in (True, False):
        model = PlainMLP()
        if not bias:
            model.fc1 = nn.Linear(12, 16, bias=False)
        out, whole = assembled(model, X, y)
        assert set(out.sinks) == {"fc1.weight", "fc2.weight"} and all(out.sinks.values())
        for name, g in reference(model, X, y).items():
            assert torch.allclose(whole[name], g, rtol=1e-11, atol=1e-14), name


def test_a_streamed_weight_is_read_by_rows_columns_or_whole():
    """A streamed weight's gradient read for some entries only (what a residual's noise reads) is those entries of
    the whole."""
    torch.manual_seed(3)
    model = PlainMLP()
    X, y = torch.randn(6, 12), torch.tensor([0, 1, 2, 3, 0, 1])
    out, whole = assembled(model, X, y)
    for name in ("fc1.weight", "fc2.weight"):
        products, full = out.products(name), whole[name]
        rows, cols = torch.tensor([3, 0, 2]), torch.tensor([1, 4])
        assert products.shape == full.shape
        for index in (..., slice(1, 3), rows, [2, 1], (slice(None), cols)):
            assert torch.allclose(products[index], full[index], rtol=1e-13, atol=1e-15), (name, index)
        with pytest.raises(IndexError):
            products[rows, cols]


def test_two_batches_gradients_added_are_the_gradient_of_both():
    """Peeling adds each round's new samples' gradient to the earlier ones' (:meth:`BatchGradient.plus`): the sum is
    the gradient of both batches together, a streamed weight's pairs laid end to end in one; a gradient of other
    parameters cannot be added."""
    torch.manual_seed(4)
    model = FlowerNet()
    X, y = torch.rand(7, 3, 32, 32), torch.tensor([0, 3, 3, 7, 9, 1, 1])
    params = {n: p.detach() for n, p in model.named_parameters()}
    net = as_network(model)
    both = batch_gradient(model, net, X[:4], y[:4]).plus(batch_gradient(model, net, X[4:], y[4:]))
    assert all(len(pairs) == 1 and len(pairs[0][0]) == 7 for pairs in both.sinks.values())
    for name, g in reference(model, X, y).items():
        got = torch.cat([p for _, p in both.row_pieces(name, params[name].shape)]).reshape(g.shape)
        assert torch.allclose(got, g, rtol=1e-11, atol=1e-14), name
    other = batch_gradient(MatmulMLP(), as_network(PlainMLP(), input_shape=(12,)), torch.randn(2, 12),
                           torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="different parameters"):
        both.plus(other)


def test_the_client_loss_vectors_are_taken_on_the_clients_batch_size():
    """Peeling's terms use the loss vectors as the client computed them, in float32, on its batch of ``client_rows``
    rows: the terms of a few samples then add up with the others' to the whole batch's, to float64 rounding."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    X, y = torch.rand(16, 784), torch.randint(0, 10, (16,))
    net = as_network(model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def terms(rows, client_rows):
        return batch_gradient(model, net, X[rows], y[rows], as_sent=True, client_rows=client_rows)

    whole = terms(slice(None), 16)
    parts = terms(slice(0, 2), 16).plus(terms(slice(2, 5), 16)).plus(terms(slice(5, None), 16))
    for name, p in params.items():
        a = torch.cat([t for _, t in whole.row_pieces(name, p.shape)])
        b = torch.cat([t for _, t in parts.row_pieces(name, p.shape)])
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-16 * float(a.abs().max())), name
