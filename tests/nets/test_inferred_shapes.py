"""The input shape a model is read at, given or inferred (images, 1-D signals, volumes), and 1-D signal models
read as CNNs of one-row maps."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import FlowerNet

import fedleak
from fedleak.errors import ModelError
from fedleak.nets import as_network


def test_shape_comes_from_inputs_then_override():
    model = FlowerNet()
    assert as_network(model, inputs=torch.zeros(2, 3, 32, 32)).notes == ()
    with pytest.raises(ModelError, match=r"does not run on inputs of shape \(3, 28, 28\)"):
        as_network(model, input_shape=(3, 28, 28))


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


def test_a_model_of_any_input_size_asks_for_it():
    """Adaptive pooling fixes no size: the smallest that runs (1x1) is no guess, so the shape is asked for."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
                          nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelError, match=r"any size from 1 pixel a side up .*pass input_shape=\(1, H, W\)"):
        as_network(model)
    assert as_network(model, input_shape=(1, 8, 8)).input_shape == (1, 8, 8)


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
    """Time series stored N x T x C and transposed in forward, read as the model is (``as_network``): one line that
    says where such a change is read (the exact methods peel it off the input: test_input_layout.py) and to store
    them as the conv reads them otherwise; 'auto' still applies."""
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 32, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x.transpose(1, 2))).flatten(1))

    with pytest.raises(ModelError, match=r"node 'transpose' .*change of layout .*read only on the model's input.*"
                                         r"N x C x T.*'auto'"):
        as_network(Transposed(), input_shape=(32, 3))
