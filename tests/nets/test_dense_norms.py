"""An eval-mode BatchNorm1d on a Linear layer's features, folded into that layer for the exact methods."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import mixed_precision_gradient, named_gradient, sized_gradient, warmed_norms

import fedleak
from fedleak.defenses.exclusivity_reduction import reduce_exclusivity
from fedleak.errors import ModelError
from fedleak.nets.dense_norms import WEIGHTS_UNREAD, fold_dense_norms


class NormedMLP(nn.Module):
    """Linear (no bias) -> BatchNorm1d -> ReLU, twice, as users write a normalised MLP."""

    def __init__(self, d_in: int, k: int, bias: bool = False, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 512, bias=bias)
        self.bn1 = nn.BatchNorm1d(512, affine=affine)
        self.fc2 = nn.Linear(512, 256, bias=bias)
        self.bn2 = nn.BatchNorm1d(256, affine=affine)
        self.out = nn.Linear(256, k)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = F.relu(self.bn1(self.fc1(x)))
        return self.out(F.relu(self.bn2(self.fc2(x))))


@pytest.mark.parametrize("bias,affine", [(False, True), (True, True), (True, False)])
def test_the_twin_computes_the_model_and_its_gradient_is_the_folded_one(digits, bias, affine):
    model = warmed_norms(NormedMLP(64, 10, bias=bias, affine=affine), digits)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    fold = fold_dense_norms(model)
    assert [f.norm for f in fold.folds] == ["bn1", "bn2"]
    x, y = digits.batch(8, seed=1)
    assert torch.allclose(fold.model(x), model(x), atol=1e-5)
    reading = fold.gradient(fedleak.GradientUpdate(named_gradient(model, x, y)))
    twin_grad = reading.update
    assert reading.reason == ""
    direct = named_gradient(fold.model, x, y)
    assert set(twin_grad.gradients) == set(direct)
    for name, g in direct.items():  # two float32 paths to one gradient: within a few epsilons of its largest entry
        assert float((twin_grad.gradients[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
    # the user's model is as it was: its norms in place, its parameters untouched
    assert isinstance(model.bn1, nn.BatchNorm1d) and (model.fc1.bias is not None) == bias
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_a_normalised_mlp_is_certified_exactly(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    x, y = digits.batch(4, seed=2)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 4 and scores.recovered_fraction == 1.0 and scores.false_certificates == 0
    assert any("BatchNorm1d 'bn1' on Linear 'fc1'" in n and "folded" in n for n in rec.notes)


def test_a_sequential_with_a_norm_is_read_too(digits):
    torch.manual_seed(0)
    model = warmed_norms(nn.Sequential(nn.Flatten(), nn.Linear(64, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                                 nn.Linear(512, 10)), digits)
    x, y = digits.batch(4, seed=3)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    assert fedleak.metrics.match(rec, x, y).recovered_fraction == 1.0


def test_a_gradient_taken_in_training_mode_certifies_nothing_and_says_why(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    x, y = digits.batch(4, seed=2)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y, mode="train"), attack="exclusivity")
    assert rec.num_certified == 0
    why = rec.why_uncertified()
    assert "gamma's gradient is not the one eval mode fixes it to" in why and "training mode" in why


def test_the_plan_says_a_gradient_shows_a_norm_in_training_mode(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    x, y = digits.batch(4, seed=2)
    trained = fedleak.plan(model, named_gradient(model, x, y, mode="train"), x)
    assert any(n.startswith("the update: BatchNorm1d 'bn1'") for n in trained.notes)
    assert not any(n.startswith("the update:") for n in fedleak.plan(model, named_gradient(model, x, y), x).notes)


def test_a_weight_update_is_left_to_the_other_attacks(digits):
    model = warmed_norms(NormedMLP(64, 10, bias=True), digits)
    x, y = digits.batch(4, seed=2)
    update = fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=1)
    with pytest.raises(ModelError, match="from its gradients"):
        fedleak.reconstruct(model, update, attack="exclusivity")
    rec = fedleak.reconstruct(model, update, attack="auto", budget=2, progress=False)
    assert any(WEIGHTS_UNREAD in n for n in rec.notes)


def test_the_analysis_and_fishing_read_the_folded_model(lfw):
    torch.manual_seed(1)
    model = warmed_norms(nn.Sequential(nn.Flatten(), nn.Linear(625, 1024, bias=False), nn.BatchNorm1d(1024), nn.ReLU(),
                                 nn.Linear(1024, 2)), lfw)
    x, y = lfw.batch(8, seed=4)
    report = fedleak.analyze_exclusivity(model, x, y)
    fished = fedleak.fish(model, x, y)
    assert fished.certifiable_after.all()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, fished.inputs, y), attack="exclusivity")
    scores = fedleak.metrics.match(rec, fished.inputs, y)
    assert scores.recovered_fraction == 1.0 and scores.false_certificates == 0
    assert report.head_certifiable.sum() < 8  # fishing made the difference (to the condition it sets)
    reduced = reduce_exclusivity(model, fished.inputs, y)  # the reverse LP reads the folded model too
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, reduced.inputs, y), attack="exclusivity")
    assert rec.num_certified == 0
    assert fedleak.plan(model, None, x).max_batch_size >= 1


def test_a_norm_whose_features_are_read_elsewhere_is_not_folded(digits):
    class Shortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.out = nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Linear(32, 10)

        def forward(self, x):
            z = self.fc1(x.flatten(1))
            return self.out(F.relu(self.bn(z)) + z)

    assert fold_dense_norms(Shortcut().eval()) is None


def test_a_norm_after_the_relu_is_refused_where_no_linear_layer_with_a_bias_reads_it(digits):
    torch.manual_seed(0)
    model = warmed_norms(nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.BatchNorm1d(128),
                                       nn.Linear(128, 10, bias=False)), digits)
    x, y = digits.batch(4, seed=2)
    with pytest.raises(ModelError, match="reads a Linear layer.s output alone.*after a ReLU.*with a bias"):
        fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")


def test_what_cannot_be_folded_is_refused_by_name(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    with torch.no_grad():
        model.bn1.weight[3] = 0.0
    with pytest.raises(ModelError, match=r"'bn1' has gamma = 0 on unit\(s\) \[3\]"):
        fold_dense_norms(model)
    bare = warmed_norms(NormedMLP(64, 10, bias=False, affine=False), digits)
    x, y = digits.batch(4, seed=2)
    with pytest.raises(ModelError, match="no bias and the BatchNorm1d no trainable shift"):
        fedleak.reconstruct(bare, sized_gradient(bare, x, y), attack="exclusivity")


def test_a_model_without_a_norm_is_not_traced(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], digits.num_classes, seed=0)
    assert fold_dense_norms(model) is None
    assert fold_dense_norms(copy.deepcopy(model)) is None


def test_the_twin_is_kept_until_the_model_changes(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    x = digits.batch(4, seed=5)[0]
    first = fold_dense_norms(model)
    assert fold_dense_norms(model) is first  # read once
    with torch.no_grad():
        model.fc1.weight.mul_(1.5)  # an optimizer's step, in place
        model.bn2.running_var.mul_(2.0)
    again = fold_dense_norms(model)
    assert again is not first and torch.allclose(again.model(x), model(x), atol=1e-5)
    model.load_state_dict(warmed_norms(NormedMLP(64, 10), digits, seed=7).state_dict())
    assert torch.allclose(fold_dense_norms(model).model(x), model(x), atol=1e-5)


def test_a_gradient_in_half_precision_is_not_certified_through_the_fold(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    x, y = digits.batch(4, seed=2)
    rec = fedleak.reconstruct(model, mixed_precision_gradient(model, x, y, torch.bfloat16), attack="exclusivity")
    assert rec.num_certified == 0 and "no longer show" in rec.why_uncertified()


def test_a_known_error_grows_with_the_rows_it_divides(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    fold = fold_dense_norms(model)
    x, y = digits.batch(4, seed=2)
    folded = fold.gradient(fedleak.GradientUpdate(named_gradient(model, x, y), error=1e-6)).update
    smallest = min(float(f.scale.abs().min()) for f in fold.folds)
    assert folded.error == pytest.approx(1e-6 * max(1.0, 1 / smallest))


def test_a_frozen_layer_under_a_norm_is_refused_as_frozen_layers_are(digits):
    model = warmed_norms(NormedMLP(64, 10), digits)
    model.fc1.weight.requires_grad_(False)
    x, y = digits.batch(4, seed=2)
    sent = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = dict(zip(sent, torch.autograd.grad(F.cross_entropy(model(x), y), list(sent.values()))))
    with pytest.raises(ModelError, match="frozen parameter"):
        fedleak.reconstruct(model, grads, attack="exclusivity")


def test_a_norm_without_parameters_in_training_mode_leaves_no_input(lfw):
    """No gamma or beta to check: the Linear bias's gradient, which a norm subtracting the batch's mean makes zero,
    tells the mode; the rows mix the batch's samples, so no input is returned (hundreds of blends were before)."""
    torch.manual_seed(3)
    model = warmed_norms(nn.Sequential(nn.Flatten(), nn.Linear(625, 1024), nn.BatchNorm1d(1024, affine=False),
                                       nn.ReLU(), nn.Linear(1024, 2)), lfw)
    x, y = lfw.batch(3, seed=7)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y, mode="train"), attack="exclusivity")
    assert len(rec) == 0 and "the Linear bias's gradient is zero to rounding" in rec.why_uncertified()


def test_the_kept_twin_does_not_keep_the_model_alive():
    import gc
    import weakref

    from fedleak.nets.exact_view import exact_view

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    assert fold_dense_norms(model) is not None and exact_view(model).fold is not None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
