"""Models the frontend cannot read: one line naming the node (or layer) and what to do instead."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import DropoutMLP, LayerNormMLP, ResidualMLP, TiedMLP

import fedleak
from fedleak.errors import ModelError
from fedleak.nets import as_network


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


def test_view_that_mixes_samples_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(x.view(-1, 16))

    with pytest.raises(ModelError, match="does not run|mixes samples"):
        as_network(Mixer(), input_shape=(8,))


def test_a_parametrized_weight_is_refused_by_name_and_auto_still_runs(digits):
    """The update holds the gradient of what computes the weight, not the weight's, and a spectral norm's does not
    give the weight's back (weight normalisation's does: tests/nets/test_weight_norm.py): no KeyError, one line
    naming the layer, and auto falls back."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    layer = parametrizations.spectral_norm(nn.Linear(64, 256))
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
    with pytest.raises(ModelError, match="ends with softmax.*NLLLoss of their log.*without its final softmax.*"
                                         "softmax applied twice"):
        as_network(model)
    inner = nn.Sequential(nn.Linear(8, 16), nn.Softmax(dim=1), nn.Linear(16, 3))
    with pytest.raises(ModelError, match="not supported"):
        as_network(inner)


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


@pytest.mark.parametrize("cut", [nn.Threshold(0.1, 0.0), nn.Threshold(0.0, -1.0)])
def test_a_threshold_other_than_a_relu_is_refused_naming_it(cut):
    """``nn.Threshold(0, 0)`` is a ReLU (values and gradient: read as one); another threshold or value is not."""
    z = torch.tensor([0.0, 1.0], requires_grad=True)
    nn.Threshold(0.0, 0.0)(z).sum().backward()
    assert z.grad.tolist() == [0.0, 1.0]  # a ReLU's gradient, which reading it as one assumes

    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.cut, self.fc2 = nn.Linear(8, 8), cut, nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.cut(self.fc1(x)))

    with pytest.raises(ModelError, match=r"node 'cut' \(Threshold\): a threshold at .* is not a ReLU"):
        as_network(Cut())
