"""Reading users' models as written: torch.fx tracing, converters, input shapes, refusals naming the node."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import (
    DropoutMLP,
    FlowerNet,
    LayerNormMLP,
    ResidualMLP,
    ReusedReluMLP,
    TiedMLP,
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


def test_shape_comes_from_inputs_then_override():
    model = FlowerNet()
    assert as_network(model, inputs=torch.zeros(2, 3, 32, 32)).notes == ()
    with pytest.raises(ModelError, match=r"does not run on inputs of shape \(3, 28, 28\)"):
        as_network(model, input_shape=(3, 28, 28))


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


class StridedNet(nn.Module):
    """A strided convolution rounds down: 7x7 and 8x8 images both give 4x4 maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


def test_an_inferred_input_shape_says_which_sizes_fit():
    """Where several squares fit (a stride rounds), the one that the most halvings divide is assumed: 8 of 7 to 8
    for a convolution of stride 2 and padding 1 (not the smallest, 7: the stride would pad a row the model was not
    built for); the note says which sizes fit, and the network's caveats (its reasons when nothing is certified)
    name them. A shape that is given has none."""
    net = as_network(StridedNet())
    assert net.input_shape == (1, 8, 8)
    assert "square images of 7 to 8 pixels a side fit, and 8 is the one that the most halvings divide" in net.notes[0]
    assert net.caveats == ("your inputs are not the (1, 8, 8) inferred for the model: square images of 7 to 8 "
                           "pixels a side fit its layers (pass input_shape=)",)
    assert as_network(StridedNet(), input_shape=(1, 8, 8)).caveats == ()
    exact = as_network(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)))
    assert exact.input_shape == (1, 8, 8) and exact.caveats == () and "pixels a side fit" not in exact.notes[0]


def test_dropout_in_training_mode_is_refused_by_name():
    with pytest.raises(ModelError, match=r"node 'dropout' \(Dropout\): dropout in training mode.*model.eval\(\)"):
        as_network(DropoutMLP(64, 32, 10).train())
    assert not as_network(DropoutMLP(64, 32, 10, p=0.0).train()).is_conv  # p = 0 is the identity


@pytest.mark.parametrize("model, needle", [
    (ResidualMLP(), r"node 'add' \(operator.add\) joins 2 branches .*optimisation attacks"),
    (LayerNormMLP(), r"node 'norm' \(LayerNorm\): not supported.*optimisation attacks \(dlg, idlg, ig"),
    (TiedMLP(), r"module 'hidden' \(Linear\) is called 2 times in forward \(shared weights\).*optimisation attacks"),
    (nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)), r"node '1' \(GELU\)"),
    (nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), r"node '1' \(Tanh\)"),
    (nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(), nn.Linear(8, 2)), r"node '1' \(LeakyReLU\)"),
    (nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2)), r"node '1' \(Sigmoid\)"),
    (nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), r"node '1' \(Dense\) does not fit"),
    (nn.Sequential(nn.Linear(8, 4), nn.ReLU()), "must end with a Linear"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 4), nn.ReLU(), nn.Linear(4, 2),
                   nn.Softmax(dim=1)), r"node '6' \(Softmax\)"),
])
def test_unsupported_models_get_one_line_naming_the_node(model, needle):
    with pytest.raises(ModelError, match=needle) as info:
        as_network(model, input_shape=(1, 8, 8) if isinstance(model[0] if isinstance(model, nn.Sequential) else None,
                                                               nn.Conv2d) else None)
    assert "\n" not in str(info.value)


def test_a_relu_module_reused_is_read_as_one_relu_per_layer():
    """Only weights shared between calls are refused; one ``nn.ReLU`` called after every layer is the usual way."""
    model = ReusedReluMLP()
    net = as_network(model)
    assert net.head.widths == (16, 16) and net.parameter_names() == [n for n, _ in model.named_parameters()]
    _same_structure(net, as_network(nn.Sequential(model.fc1, nn.ReLU(), model.fc2, nn.ReLU(), model.fc3)))


class InputArithmetic(nn.Module):
    """A normalisation inside forward, or any arithmetic with constants on the input (``op``)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.op(x))))


@pytest.mark.parametrize("op, node", [(lambda x: (x - 0.5) / 0.25, "sub"), (lambda x: x + 1.0, "add"),
                                      (lambda x: x.mul(2.0), "mul")])
def test_arithmetic_on_the_input_says_to_normalise_the_data_instead(op, node):
    """``(x - mean) / std`` in forward: one line naming the node, which says what to do (not "joins 2 branches":
    a constant is not a branch)."""
    with pytest.raises(ModelError, match=rf"node '{node}' .*: arithmetic on the model's input .*normalise the data "
                                         r"instead \(fedleak.Dataset.normalized\(mean, std\)"):
        as_network(InputArithmetic(op))


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


def _ordered_dict_mlp():
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(64, 48), relu1=nn.ReLU(), fc2=nn.Linear(48, 48),
                                     relu2=nn.ReLU(), out=nn.Linear(48, 10)))


@pytest.mark.parametrize("make", [InplaceRelu, LayerList, _ordered_dict_mlp])
def test_mlps_as_users_write_them_attack_as_their_sequential_twin(make, digits):
    """In-place ReLUs, a ModuleList walked in a loop, a Sequential of named layers: the same network, weights
    read by the model's own names, and the same certified samples as its nn.Sequential twin."""
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


def test_view_that_mixes_samples_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(x.view(-1, 16))

    with pytest.raises(ModelError, match="does not run|mixes samples"):
        as_network(Mixer(), input_shape=(8,))


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


def test_a_model_of_any_input_size_asks_for_it():
    """Adaptive pooling fixes no size: the smallest that runs (1x1) is no guess, so the shape is asked for."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
                          nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelError, match=r"any size from 1 pixel a side up .*pass input_shape=\(1, H, W\)"):
        as_network(model)
    assert as_network(model, input_shape=(1, 8, 8)).input_shape == (1, 8, 8)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "legacy weight_norm"])
def test_a_parametrized_weight_is_refused_by_name_and_auto_still_runs(digits, wrap):
    """The update holds the gradients of what computes the weight (g and v), not the weight's: no KeyError, one
    line naming the layer, and auto falls back."""
    from torch.nn.utils import parametrizations, weight_norm

    torch.manual_seed(0)
    layer = nn.Linear(64, 256)
    layer = (weight_norm(layer) if wrap.startswith("legacy") else getattr(parametrizations, wrap)(layer))
    model = nn.Sequential(nn.Flatten(), layer, nn.ReLU(), nn.Linear(256, 10)).eval()
    x, y = digits.batch(1, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(ModelError, match=r"node '1' .*its weight is computed from '.*weight.*'.*'auto'"):
        fedleak.reconstruct(model, update)
    with pytest.raises(ModelError, match=r"'1' that reads the sample: its weight is computed"):
        fedleak.reconstruct(model, update, attack="first-layer")
    rec = fedleak.reconstruct(model, update, attack="auto", budget=0.3, progress=False)
    assert rec.num_certified == 0 and "its weight is computed" in rec.samples[0].reason


def test_a_pruned_weight_is_refused_naming_the_pruning(digits):
    """torch.nn.utils.prune computes the weight as weight_orig times a mask: the update holds weight_orig's gradient,
    zero under the mask; the line says so (it read as a parametrization), and auto still runs."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    x, y = digits.batch(2, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    assert "1.weight_orig" in update.gradients
    with pytest.raises(ModelError, match=r"node '1' .*pruned \(torch.nn.utils.prune\).*'weight_mask'"):
        fedleak.reconstruct(model, update)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=0.3, progress=False)
    assert rec.num_certified == 0 and "pruned" in rec.samples[0].reason


def test_a_final_softmax_says_what_to_pass():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(dim=1))
    with pytest.raises(ModelError, match="ends with softmax.*NLLLoss of their log.*without its final softmax"):
        as_network(model)
    inner = nn.Sequential(nn.Linear(8, 16), nn.Softmax(dim=1), nn.Linear(16, 3))
    with pytest.raises(ModelError, match="not supported"):
        as_network(inner)


def test_probe_leaves_batch_norm_statistics_alone():
    from fedleak.models.convnet import make_convnet

    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    as_network(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_new_layer_is_one_converter():
    # nn.Threshold(0, 0) is a ReLU; fedleak does not know it until one converter says so
    model = nn.Sequential(nn.Linear(4, 4), nn.Threshold(0.0, 0.0), nn.Linear(4, 2))
    with pytest.raises(ModelError, match="'1' \\(Threshold\\)"):
        as_network(model)

    def threshold(op):
        if op.module.threshold != 0 or op.module.value != 0:
            raise op.refuse("only Threshold(0, 0), a ReLU, is supported")
        return Relu(op.node)

    CONVERTERS.register(nn.Threshold, threshold)
    try:
        net = as_network(model)
        assert isinstance(net.head.dense[1], Dense) and net.head.depth == 1
        with pytest.raises(ModelError, match="'1' \\(Threshold\\): only Threshold"):
            as_network(nn.Sequential(nn.Linear(4, 4), nn.Threshold(0.5, 0.0), nn.Linear(4, 2)))
    finally:
        CONVERTERS.unregister(nn.Threshold)
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


def test_untraceable_forward_is_a_model_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(ModelError, match="could not trace Branchy.forward"):
        as_network(Branchy())


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


class Signal1d(nn.Module):
    """A 1-D CNN of the kind time-series clients train (ECG, activity): Conv1d, F.relu, flatten, Linear."""

    def __init__(self, length=64):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 5, padding=2)
        self.fc = nn.Linear(4 * length, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_input_shape_of_one_and_three_dimensional_convolutions():
    """A Conv1d model takes (C, L) signals and a Conv3d model (C, D, H, W) volumes: the shortest that fits is
    inferred, as the square image is for a Conv2d model (a later Linear layer's width is not the input's)."""
    from fedleak.nets import input_shape_of

    shape, notes = input_shape_of(Signal1d())
    assert shape == (2, 64) and "signals of the only length that fits" in notes[0]
    cube = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 ** 3, 2))
    assert input_shape_of(cube)[0] == (1, 6, 6, 6)
    assert input_shape_of(nn.Sequential(nn.LayerNorm(12), nn.Linear(12, 2)))[0] == (12,)


def test_a_first_layer_that_does_not_say_the_input_shape_is_named():
    """A recurrent (or embedding) first layer does not give the input's shape: one line names it; a Linear layer
    after it is not read as the input's width."""
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    from fedleak.nets import input_shape_of

    with pytest.raises(ModelError, match=r"first layer with weights, 'rnn' \(GRU\), does not say the shape"):
        input_shape_of(Recurrent())
    x, y = torch.rand(2, 10, 4), torch.tensor([0, 2])
    update = fedleak.compute_gradient_update(Recurrent(), x, y)
    with pytest.raises(ModelError, match="could not derive it from the layer shapes: .*'rnn' .*pass input_shape="):
        fedleak.reconstruct(Recurrent(), update, attack="ig")


def test_a_conv1d_model_is_read_as_a_cnn_of_one_row_maps_and_rebuilt_exactly(digits):
    """A Conv1d network on (C, L) signals (here each 8 x 8 digit as one 64-sample signal) is read as a CNN of (C, 1, L)
    maps with 1 x k kernels: the exact attack rebuilds and certifies its samples exactly, and its 1-D pools and
    BatchNorm1d convert; BatchNorm1d on a dense layer's features is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(512, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    net = as_network(model)
    assert net.input_shape == (1, 64) and [(b.in_shape, b.out_shape) for b in net.blocks] == [((1, 1, 64), (8, 1, 64))]
    x, y = digits.batch(4, seed=0)
    x = x.reshape(4, 1, 64)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.inputs.shape == (4, 1, 64) and rec.num_certified == 4
    assert int(scores.recovered.sum()) == 4 and scores.false_certificates == 0
    plan = fedleak.plan(model, None, x, batch_sizes=[4])
    assert [(b.name, b.unknowns, b.max_equations, b.status) for b in plan.blocks] == [("0", 64, 512, "determined")]
    pooled = as_network(nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding="valid"), nn.BatchNorm1d(4).eval(),
                                      nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(28, 8), nn.ReLU(),
                                      nn.Linear(8, 2)), input_shape=(2, 32))
    block = pooled.blocks[0]
    assert block.conv.stride == (1, 2) and block.pool.kernel == (1, 2) and block.bn is not None
    assert block.out_shape == (4, 1, 7) and pooled.input_shape == (2, 32)
    with pytest.raises(ModelError, match=r"BatchNorm1d is a layer of this chain only after a Conv1d.*fold"):
        as_network(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8).eval(), nn.ReLU(), nn.Linear(8, 2)))


def test_inferring_the_shape_of_a_traced_model_prints_nothing(capsys):
    """A federation's audit template is torch.fx's GraphModule, which prints its generated code to stderr when a
    forward fails: the shapes tried while inferring the input's (here 63 signal lengths that the view refuses)
    are answers, and print nothing."""
    from torch import fx

    class Viewed(Signal1d):
        def forward(self, x):
            return super().forward(x.view(x.size(0), 2, 64))

    traced = fx.symbolic_trace(Viewed())
    assert as_network(traced).input_shape == (2, 64)
    assert capsys.readouterr().err == ""


def test_a_model_that_adds_the_channel_axis_itself_takes_flat_signals(digits):
    """``x.unsqueeze(1)`` before a Conv1d (flat signals in, the channel axis added in forward) is a reshape: the
    input shape (64,) is inferred and the batch is rebuilt exactly."""
    class Unsqueezed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 5, padding=2)
            self.fc1 = nn.Linear(512, 1024)
            self.fc2 = nn.Linear(1024, 10)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(F.relu(self.conv(x.unsqueeze(1))).flatten(1))))

    torch.manual_seed(0)
    model = Unsqueezed()
    assert as_network(model).input_shape == (64,)
    x, y = digits.batch(4, seed=0)
    x = x.reshape(4, 64)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert rec.num_certified == 4 and int(fedleak.metrics.match(rec, x, y).recovered.sum()) == 4


def test_several_reshapes_before_a_conv_are_one():
    """``nn.Flatten`` then ``nn.Unflatten`` into (1, L) signals before a Conv1d (an image read as one signal):
    the run of reshapes leads into the conv block (it was read as the head, which refused the conv)."""
    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, 64)), nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    net = as_network(model, input_shape=(1, 8, 8))
    assert [b.in_shape for b in net.blocks] == [(1, 1, 64)] and net.head.widths == (32,)


def test_inferring_a_shape_stops_trying_after_its_time(monkeypatch):
    """Every size tried fails in an unflatten, slowly: inference gives up after ``INFER_SECONDS`` and asks for the
    shape instead of trying thousands of lengths."""
    from fedleak.nets import input_shape_of, input_shapes

    monkeypatch.setattr(input_shapes, "INFER_SECONDS", 0.0)
    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, 64)), nn.Conv1d(1, 4, 5, padding=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(ModelError, match=r"trying more takes too long; pass input_shape=\(1, L\)"):
        input_shape_of(model)
    assert input_shape_of(model, input_shape=(1, 8, 8))[0] == (1, 8, 8)


def test_a_change_of_layout_is_refused_saying_what_to_do():
    """Time series stored N x T x C and transposed in forward: one line that says to store them as the conv reads
    them; 'auto' still applies."""
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 32, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x.transpose(1, 2))).flatten(1))

    with pytest.raises(ModelError, match=r"node 'transpose' .*change of layout .*N x C x T.*'auto'"):
        as_network(Transposed(), input_shape=(32, 3))


class TokenMLP(nn.Module):
    """A text classifier: an embedding of 8 token indices, then a ReLU MLP."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.fc1 = nn.Linear(16 * 8, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.emb(x).flatten(1))))


def test_a_model_that_reads_token_indices_is_refused_by_every_attack_saying_what_leaks():
    """No attack rebuilds token indices; each says so in one line (not "pass input_shape=", which cannot help),
    and names what the update gives away anyway: the embedding's gradient rows that are not zero are the tokens."""
    torch.manual_seed(0)
    model = TokenMLP()
    x, y = torch.randint(0, 100, (4, 8)), torch.tensor([0, 1, 0, 1])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert set((grads[0].abs().sum(1) > 0).nonzero().flatten().tolist()) == set(x.flatten().tolist())
    for attack in ("exclusivity", "first-layer", "auto", "ig"):
        with pytest.raises(ModelError, match=r"'emb' \(Embedding\), reads token indices.*rows of 'emb.weight''s "
                                             r"gradient that are not zero$"):
            fedleak.reconstruct(model, list(grads), attack=attack)
    with pytest.raises(ModelError, match="if the model reads token indices"):  # a shape given: the forward says
        fedleak.reconstruct(model, list(grads), attack="ig", input_shape=(8,), iterations=2)


@pytest.mark.parametrize("op", [lambda z: z.clamp(min=0), lambda z: torch.clamp(z, 0), lambda z: z.clamp_min(0)])
def test_clamp_at_zero_is_refused_with_why_it_is_not_a_relu(op):
    """``clamp(min=0)`` has a ReLU's values but passes gradient at exactly 0 (torch keeps the boundary): refused,
    saying to write F.relu; other clamps are unsupported as before."""

    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(op(self.fc1(x)))

    z = torch.tensor([0.0, 1.0], requires_grad=True)
    op(z).sum().backward()
    assert z.grad.tolist() == [1.0, 1.0]  # what the refusal says: a ReLU's would be [0, 1]
    with pytest.raises(ModelError, match=r"clamp\(min=0\) is a ReLU whose gradient also passes where its input is "
                                         r"exactly 0 .*write F.relu"):
        as_network(Clamped())


def test_a_clamp_to_a_range_is_not_supported():
    class Bounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x).clamp(0, 6))

    with pytest.raises(ModelError, match=r"node 'clamp' \(.clamp\(\)\): not supported"):
        as_network(Bounded())
