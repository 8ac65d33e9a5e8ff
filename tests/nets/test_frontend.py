"""Reading users' models as written: torch.fx tracing, converters, functional twins, pooling, the trace kept."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import (
    DropoutMLP,
    FlowerNet,
    ReusedReluMLP,
    dropout_mlp_twin,
    flower_net_twin,
)

import fedleak
from fedleak.errors import ModelError
from fedleak.nets import CONVERTERS, Dense, Op, Relu, as_network


def _same_structure(a, b):
    assert a.input_shape == b.input_shape
    assert [(blk.in_shape, blk.conv_shape, blk.out_shape, blk.pool.kind if blk.pool else None) for blk in a.blocks] == \
           [(blk.in_shape, blk.conv_shape, blk.out_shape, blk.pool.kind if blk.pool else None) for blk in b.blocks]
    assert a.head.widths == b.head.widths and a.num_classes == b.num_classes


def test_flower_quickstart_net_as_written():
    model = FlowerNet()
    net = as_network(model)
    assert net.input_shape == (3, 32, 32) and net.notes and "square" in net.notes[0]
    assert [blk.out_shape for blk in net.blocks] == [(6, 14, 14), (16, 5, 5)]
    assert [blk.pool.kind for blk in net.blocks] == ["max", "max"]
    assert net.head.widths == (120, 84) and net.num_classes == 10
    assert net.parameter_names() == [n for n, _ in model.named_parameters()]
    x = torch.rand(3, 3, 32, 32)
    feats = torch.flatten(model.pool(F.relu(model.conv2(model.pool(F.relu(model.conv1(x)))))), 1)
    assert torch.allclose(net.features(x).float(), feats, atol=1e-5)
    _same_structure(net, as_network(flower_net_twin(model), input_shape=(3, 32, 32)))


def test_dropout_mlp_in_eval_mode_is_its_sequential_twin():
    model = DropoutMLP(64, 32, 10).eval()
    net = as_network(model)
    assert net.input_shape == (64,) and not net.is_conv and net.head.widths == (32,)
    assert [d.weight_name for d in net.head.dense] == ["fc1.weight", "fc2.weight"]
    _same_structure(net, as_network(dropout_mlp_twin(model)))
    # images in, flattened inside the model: the input shape follows the batch
    assert as_network(model, inputs=torch.zeros(4, 1, 8, 8)).input_shape == (1, 8, 8)


def test_eval_mode_dropout_is_noted_by_name_and_rate():
    """Eval-mode Dropout is the identity in the chain; the network keeps it aside and its notes say that a client
    in training mode sends an update the exact methods cannot certify. A rate of 0 is no dropout at all."""
    net = as_network(DropoutMLP(64, 32, 10, p=0.3).eval())
    assert [(d.name, d.p) for d in net.dropout] == [("dropout", 0.3)]
    assert all(not isinstance(s.layer, fedleak.nets.Dropout) for s in net.steps)
    note = next(n for n in net.notes if "Dropout" in n)
    assert "'dropout' (p = 0.3)" in note and "training mode" in note and "eval mode" in note
    assert net.caveats and "training mode" in net.caveats[0]
    bare = as_network(DropoutMLP(64, 32, 10, p=0.0).eval())
    assert bare.dropout == () and bare.caveats == () and not any("Dropout" in n for n in bare.notes)


def test_a_relu_module_reused_is_read_as_one_relu_per_layer():
    """Only weights shared between calls are refused; one ``nn.ReLU`` called after every layer is the usual way."""
    model = ReusedReluMLP()
    net = as_network(model)
    assert net.head.widths == (16, 16) and net.parameter_names() == [n for n, _ in model.named_parameters()]
    _same_structure(net, as_network(nn.Sequential(model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3)))


def test_functional_twins_and_log_softmax_logits():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc1 = nn.Linear(4 * 4 * 4, 16)
            self.fc2 = nn.Linear(16, 3)

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.conv(x)), 2)
            x = x.reshape(x.size(0), -1)
            x = self.fc1(x).relu_()
            return F.log_softmax(self.fc2(x), dim=1)

    net = as_network(Functional(), inputs=torch.zeros(2, 1, 8, 8))
    assert net.blocks[0].pool.kind == "max" and net.blocks[0].out_shape == (4, 4, 4) and net.head.depth == 1


class LogSoftmaxOut(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2, self.dim = nn.Linear(64, 256), nn.Linear(256, 10), dim

    def forward(self, x):
        logits = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return F.log_softmax(logits) if self.dim == "none" else F.log_softmax(logits, dim=self.dim)


def test_log_softmax_without_a_dim_is_over_the_classes(digits):
    """Older code writes F.log_softmax(x): torch takes dimension 1 of the logits; dimension 0 mixes samples."""
    import warnings

    torch.manual_seed(0)
    model = LogSoftmaxOut("none").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "implicit dimension choice" warning
        x, y = digits.batch(4, seed=0)
        grads = torch.autograd.grad(F.nll_loss(model(x), y), list(model.parameters()))
        rec = fedleak.reconstruct(model, list(grads), num_examples=4)
    assert rec.num_certified == 4 and fedleak.metrics.match(rec, x, y, data_range=(0, 1)).false_certificates == 0
    with pytest.raises(ModelError, match="over dimension 0 of the logits mixes the samples"):
        as_network(LogSoftmaxOut(0))


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act = nn.Linear(64, 48), nn.ReLU(inplace=True)
        self.fc2, self.fc3 = nn.Linear(48, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x.view(x.size(0), -1)))), inplace=True))


class LayerList(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 48), nn.Linear(48, 48), nn.Linear(48, 10)])

    def forward(self, x):
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class ThresholdAtZero(nn.Module):
    """ReLUs written as thresholds at 0 with the value 0: ``nn.Threshold(0, 0)`` and ``F.threshold(x, 0, 0)``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.cut = nn.Linear(64, 48), nn.Threshold(0.0, 0.0)
        self.fc2, self.fc3 = nn.Linear(48, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(F.threshold(self.fc2(self.cut(self.fc1(x.flatten(1)))), 0, 0))


def _ordered_dict_mlp():
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 48), relu1=nn.ReLU(), fc2=nn.Linear(48, 48),
                                     relu2=nn.ReLU(), out=nn.Linear(48, 10)))


@pytest.mark.parametrize("make", [InplaceRelu, LayerList, _ordered_dict_mlp, ThresholdAtZero])
def test_mlps_as_users_write_them_attack_as_their_sequential_twin(make, digits):
    """In-place ReLUs, a ModuleList walked in a loop, a Sequential of named layers, ReLUs written as thresholds at 0:
    the same network, weights read by the model's own names, and the same certified samples as its nn.Sequential
    twin."""
    torch.manual_seed(0)
    model = make().eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    twin = nn.Sequential(nn.Flatten(), linears[0], nn.ReLU(), linears[1], nn.ReLU(), linears[2])
    net = as_network(model, input_shape=(1, 8, 8))
    assert net.head.widths == (48, 48) and net.parameter_names() == [n for n, _ in model.named_parameters()]
    x, y = digits.batch(4, seed=5)
    recs = [fedleak.reconstruct(m, fedleak.compute_gradient_update(m, x, y)) for m in (model, twin)]
    assert recs[0].certified.sum() >= 1 and recs[0].certified.tolist() == recs[1].certified.tolist()
    assert torch.equal(recs[0].inputs, recs[1].inputs)
    assert not fedleak.metrics.match(recs[0], x, y).false_certificate.any()


def test_adaptive_pool_with_dividing_output_is_a_pool():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
                          nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 2))
    net = as_network(model, input_shape=(1, 8, 8))
    assert net.blocks[0].pool.kind == "avg" and net.blocks[0].pool.kernel == (2, 2)
    with pytest.raises(ModelError, match="uneven"):
        as_network(model, input_shape=(1, 7, 7))


class GlobalPool(nn.Module):
    """Global pooling written as a reduction over the maps, as modern CNN code does."""

    def __init__(self, reduce, maps: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1) if maps == 2 else nn.Conv1d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.reduce = reduce

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.reduce(F.relu(self.conv(x))))))


@pytest.mark.parametrize("reduce, maps, kind", [
    (lambda a: a.mean((2, 3)), 2, "avg"), (lambda a: a.mean(dim=[-1, -2]), 2, "avg"),
    (lambda a: torch.mean(a, (2, 3), keepdim=True).flatten(1), 2, "avg"), (lambda a: a.amax((2, 3)), 2, "max"),
    (lambda a: a.mean(-1), 1, "avg")])
def test_a_mean_over_the_maps_is_global_pooling(reduce, maps, kind):
    torch.manual_seed(0)
    model = GlobalPool(reduce, maps).eval()
    shape = (1, 6, 6) if maps == 2 else (1, 12)
    net = as_network(model, input_shape=shape)
    pool = net.blocks[0].pool
    assert pool.kind == kind and pool.kernel == ((6, 6) if maps == 2 else (1, 12))
    x = torch.rand(3, *shape)
    assert torch.allclose(net.features(x), reduce(F.relu(model.conv(x))).double().flatten(1))
    # 4 pooled values cannot pin down an input: read, and certifiable nowhere
    report = fedleak.analyze_exclusivity(model, x, torch.tensor([0, 1, 0]))
    assert not report.certifiable.any()


@pytest.mark.parametrize("reduce, match", [
    (lambda a: a.mean(2), r"reduces dimensions \(2,\).*every position of each map at once"),
    (lambda a: a.mean((2, 3), dtype=torch.float64).float(), "without a dtype"),
    (lambda a: a.sum((2, 3)), r"\.sum\(\)\): not supported")])
def test_other_reductions_are_refused_saying_what_is_read(reduce, match):
    model = GlobalPool(lambda a: reduce(a).reshape(len(a), -1)[:, :4]).eval()
    with pytest.raises(ModelError, match=match):
        as_network(model, input_shape=(1, 6, 6))


def test_probe_leaves_batch_norm_statistics_alone():
    from fedleak.models.convnet import make_convnet

    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    as_network(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_new_layer_is_one_converter():
    # nn.LeakyReLU(0.0) is a ReLU; fedleak does not know it until one converter says so
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.0), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="'1' \\(LeakyReLU\\)"):
        as_network(model)

    def leaky_relu(op):
        if op.module.negative_slope != 0:
            raise op.refuse("only LeakyReLU(0.0), a ReLU, is supported")
        return Relu(op.node)

    CONVERTERS.register(nn.LeakyReLU, leaky_relu)
    try:
        net = as_network(model)
        assert isinstance(net.head.dense[1], Dense) and net.head.depth == 1
        with pytest.raises(ModelError, match="'1' \\(LeakyReLU\\): only LeakyReLU"):
            as_network(nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2)))
    finally:
        CONVERTERS.unregister(nn.LeakyReLU)
    with pytest.raises(RuntimeError, match="registered twice"):
        CONVERTERS.register(nn.Linear, lambda op: None)


def test_builders_and_parameter_names_of_nested_sequentials():
    model = nn.Sequential(nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU()), nn.Linear(5, 3, bias=False))
    net = as_network(model)
    assert net.head.depth == 1 and not net.head.has_all_biases
    assert net.head.dense[0].weight_name == "0.0.weight" and net.head.dense[0].bias_name is None
    mlp = fedleak.make_mlp((1, 8, 8), [32, 16], 10, seed=3)
    net = as_network(mlp)
    assert net.input_shape == (1, 8, 8) and net.head.widths == (32, 16)
    assert net.parameter_names() == [n for n, _ in mlp.named_parameters()]


def test_op_arguments_by_position_or_keyword():
    op = Op(node="p", what="F.max_pool2d", target="", module=None, args=(2,), kwargs={"stride": 2})
    assert op.arg(0, "kernel_size") == 2 and op.arg(1, "stride") == 2 and op.arg(2, "padding", 0) == 0


def test_a_model_is_traced_once_but_never_read_stale():
    from fedleak.models.convnet import make_convnet

    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), batch_norm=True)
    first = as_network(model)
    A1 = first.blocks[0].affine[0].toarray()
    with torch.no_grad():  # the weights change in place; the structure does not
        model[0].weight.data.copy_(2 * model[0].weight)
    second = as_network(model)
    assert second is not first and second.steps == first.steps  # the trace is reused ...
    assert np.allclose(second.blocks[0].affine[0].toarray(), 2 * A1, rtol=1e-12)  # ... the unrolled maps are not
    with pytest.raises(ModelError, match="training mode"):  # a change of mode is a change of structure
        as_network(model.train())
    model.eval()
    model[0] = nn.Conv2d(1, 2, 3)  # a new module: traced again
    assert as_network(model).blocks[0].conv.owner is model[0]


def test_sequential_is_read_without_the_tracer_and_the_same_as_traced():
    from torch import fx

    from fedleak.models.convnet import make_convnet
    from fedleak.nets.tracing import sequential_graph

    model = make_convnet((1, 12, 12), 3, channels=(2, 4), pool="max", fc_widths=(8,), batch_norm=True)
    direct = sequential_graph(model)
    traced = fx.symbolic_trace(model)
    assert [n.target for n in direct.graph.nodes if n.op == "call_module"] == \
           [n.target for n in traced.graph.nodes if n.op == "call_module"]
    x = torch.rand(3, 1, 12, 12)
    assert torch.equal(direct(x), model(x))

    class Custom(nn.Module):  # a user's module inside a Sequential: traced through by fx
        def forward(self, x):
            return torch.relu(x)

    assert sequential_graph(nn.Sequential(nn.Linear(4, 4), Custom(), nn.Linear(4, 2))) is None
    assert as_network(nn.Sequential(nn.Linear(4, 4), Custom(), nn.Linear(4, 2))).head.depth == 1
