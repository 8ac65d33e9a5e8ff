"""DLG, iDLG and Inverting Gradients on FedSGD gradients; label inference; budgets; shared machinery."""

from __future__ import annotations

import pytest
import torch
from user_models import BatchNormMLP

import fedleak
from fedleak.attacks.labels import infer_label_counts, infer_labels
from fedleak.clients import fedavg_update
from fedleak.models.cnn import make_lenet

pytestmark = pytest.mark.usefixtures("one_thread")


def _psnr(rec, x, y=None):
    return fedleak.metrics.match(rec, x, y).mean_psnr()


def test_idlg_label_rule_single_sample(digits):
    model = make_lenet(digits.input_shape, 10, activation="sigmoid", seed=0)
    for seed in range(10):
        x, y = digits.batch(1, seed=100 + seed)
        grads = fedleak.compute_gradient_update(model, x, y).gradients
        assert infer_labels(model, grads, 1).tolist() == y.tolist()


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_batch_label_counts_from_the_sign_pattern(digits, scale):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    hits = 0
    for seed in range(10):
        x, y = digits.batch(8, seed=200 + seed)
        grads = {k: scale * v for k, v in fedleak.compute_gradient_update(model, x, y).gradients.items()}
        hits += torch.equal(infer_labels(model, grads, 8), torch.sort(y).values)
    assert hits >= 8  # exact multiset of labels for (nearly) every batch, whatever the scale


def test_label_counts_respect_known_labels():
    counts = infer_label_counts(torch.tensor([-0.3, 0.1, 0.1, 0.1]), 3, known=torch.tensor([1]))
    assert counts.sum() == 3 and counts[1] >= 1 and counts[0] >= 1


def test_ig_reconstructs_a_digit_from_its_gradient(digits):
    x, y = digits.batch(1, seed=31)
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, grads, attack="ig", iterations=300)
    assert rec.attack == "ig" and rec.iterations == 300 and not rec.certified.any()
    assert rec.labels.tolist() == y.tolist()
    assert float(rec.inputs.min()) >= 0 and float(rec.inputs.max()) <= 1  # box constraint
    guess = fedleak.metrics.match(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), x).mean_psnr()
    assert _psnr(rec, x, y) > 25 > guess + 10


def test_an_unknown_batch_size_is_at_least_the_classes_the_update_shows(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(8, seed=7)
    bare = dict(fedleak.compute_gradient_update(model, x, y).gradients)  # no num_examples
    rec = fedleak.reconstruct(model, bare, attack="ig", iterations=5)
    shown = int((bare["3.bias"] < 0).sum())
    assert 1 < shown <= len(set(y.tolist())) and len(rec) == rec.batch_size == shown
    assert any(f"assumed {shown}, the number of classes" in note for note in rec.notes)
    assert set(rec.labels.tolist()) <= set(y.tolist())


def test_label_counts_have_one_entry_per_class_when_labels_are_given(digits):
    """Labels given (or fixed by auto's exact route) that miss the last classes still count every class."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(3, seed=2)
    labels = torch.tensor([0, 1, 1])
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, labels), attack="ig", iterations=2,
                              labels=labels)
    assert rec.label_counts.tolist() == [1, 2] + [0] * 8


def test_batchnorm_in_training_mode_is_simulated_on_the_dummy_batch(digits):
    """A client that trains BatchNorm on its batch's statistics: the search runs the model in the mode it is given;
    a batch of one, which such a model cannot run, is refused in one line that says what to do."""
    torch.manual_seed(0)
    model = BatchNormMLP().train()
    x, y = digits.batch(6, seed=3)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(named, num_examples=6), attack="ig", iterations=3)
    assert len(rec) == 6 and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running statistics untouched
    with pytest.raises(fedleak.FedleakError, match=r"dummy batch: the model cannot take inputs of shape \(1, 64\).*"
                                                   r"BatchNorm layer in training mode needs at least 2 inputs per "
                                                   r"batch: pass batch_size") as info:
        fedleak.reconstruct(model, list(grads), attack="ig", iterations=3, batch_size=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("attack", ["dlg", "idlg"])
def test_dlg_and_idlg_on_sigmoid_lenet(digits, attack):
    x, y = digits.batch(1, seed=32)
    model = make_lenet(digits.input_shape, 10, activation="sigmoid", seed=0)
    grads = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, grads, attack=attack, iterations=150)
    assert rec.iterations <= 150 and rec.labels.tolist() == y.tolist()
    assert _psnr(rec, x, y) > 20


def test_ig_on_a_one_step_weight_delta_is_scale_free(digits):
    x, y = digits.batch(2, seed=33)
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.02)
    rec = fedleak.reconstruct(model, update, attack="ig", iterations=300)
    assert _psnr(rec, x, y) > 20


def test_time_budget_stops_and_says_so(digits):
    x, y = digits.batch(2, seed=34)
    model = make_lenet(digits.input_shape, 10, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, grads, attack="ig", iterations=100000, time_budget=0.5)
    assert rec.iterations < 100000
    assert any("stopped by the time budget" in n for n in rec.notes)


def test_model_is_never_mutated_and_progress_runs(digits, capsys):
    x, y = digits.batch(1, seed=35)
    model = make_lenet(digits.input_shape, 10, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = fedleak.compute_gradient_update(model, x, y)
    fedleak.reconstruct(model, grads, attack="ig", iterations=5, progress=True)
    fedleak.reconstruct(model, grads, attack="dlg", iterations=5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "ig" in capsys.readouterr().err  # the tqdm bar


def test_bad_gradient_input(digits):
    x, y = digits.batch(1, seed=36)
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    with pytest.raises(fedleak.FedleakError, match="zero"):
        fedleak.reconstruct(model, {k: torch.zeros_like(v) for k, v in grads.items()}, attack="ig")
    with pytest.raises(fedleak.FedleakError, match="does not match"):
        fedleak.reconstruct(model, {k: v for k, v in grads.items() if k != "1.bias"}, attack="dlg")
    with pytest.raises(fedleak.FedleakError, match="iterations"):
        fedleak.reconstruct(model, grads, attack="ig", iterations=0)
    # a model without input_shape: flat inputs of the first Linear layer's size
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    rec = fedleak.reconstruct(bare, fedleak.compute_gradient_update(bare, x, y), attack="ig", iterations=2)
    assert rec.inputs.shape == (1, 64)

    class Branchy(torch.nn.Module):  # fx cannot trace it: its input shape is found by running it
        def __init__(self, side: int = 0):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
            self.side = side

        def forward(self, x):
            assert not self.side or x.shape[-1] == self.side, "wants square images"
            return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))

    branchy = Branchy()
    rec = fedleak.reconstruct(branchy, fedleak.compute_gradient_update(branchy, x, y), attack="ig", iterations=2)
    assert rec.inputs.shape == (1, 64)
    square = Branchy(side=8)  # its first layer's width does not run it: the message asks for the shape
    with pytest.raises(fedleak.ModelError, match=r"shape \(64,\).*wants square images.*pass input_shape="):
        fedleak.reconstruct(square, fedleak.compute_gradient_update(square, x, y), attack="ig")
    rec = fedleak.reconstruct(square, fedleak.compute_gradient_update(square, x, y), attack="ig", iterations=2,
                              input_shape=(1, 8, 8))
    assert rec.inputs.shape == (1, 1, 8, 8)


def test_random_start_is_not_the_users_seeded_data():
    """Test data drawn with ``torch.Generator().manual_seed(0)`` must not be the attack's own random start at
    seed 0: a search that never moved would then report a perfect reconstruction."""
    model = fedleak.make_mlp((1, 4, 4), [32], 4, seed=0)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="ig", iterations=1, seed=0, progress=False)
    scores = fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))
    assert float(scores.psnr.max()) < 40.0


class _SkipNet(torch.nn.Module):
    """A residual MLP whose skip layer is registered after the output layer (the last Linear registered)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.out = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)
        self.skip = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(torch.relu(self.fc1(x)) + self.skip(x))


def test_labels_are_read_from_the_layer_the_model_returns(digits):
    """The output layer is the Linear the forward returns, not the last one registered (here a 64 -> 32 skip layer,
    whose gradient rows were read as 32 'classes' and crashed IG with torch's IndexError)."""
    from fedleak.attacks.labels import output_layer_names

    torch.manual_seed(0)
    model = _SkipNet()
    assert output_layer_names(model) == ("out.weight", "out.bias")
    x, y = digits.batch(1, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="idlg", iterations=5)
    assert rec.labels.tolist() == y.tolist()


@pytest.mark.parametrize("loss", [{"label_smoothing": 0.2}, {"class_weights": tuple(range(1, 11))}])
def test_the_simulated_client_takes_the_clients_loss(digits, loss):
    """Told the client's label smoothing or class weights, the optimisation attacks simulate the gradient of that
    loss: at the true batch it is the client's own, which the plain cross-entropy's is not."""
    from fedleak.attacks.inversion import FunctionalModel, prepare_target

    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    x, y = digits.batch(4, seed=1)
    update = fedleak.compute_gradient_update(model, x, y, **loss)
    target = prepare_target(model, update)
    told = FunctionalModel(model, target, **loss).simulate(x, y, kind="gradient")
    plain = FunctionalModel(model, target).simulate(x, y, kind="gradient")
    for t, s in zip(target.tensors, told):
        torch.testing.assert_close(s.detach(), t, rtol=1e-5, atol=1e-7)
    assert max(float((s.detach() - t).abs().max()) for t, s in zip(target.tensors, plain)) > 1e-3
    rec = fedleak.reconstruct(model, update, attack="ig", iterations=5, labels=y, **loss)
    assert rec.inputs.shape == x.shape
    with pytest.raises(fedleak.FedleakError, match="with label_smoothing is not supported"):
        fedleak.reconstruct(model, update, attack="ig", iterations=5, label_smoothing=0.1,
                            class_weights=tuple(range(1, 11)))
