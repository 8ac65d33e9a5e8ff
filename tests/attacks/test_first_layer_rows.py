"""A batch's first-layer rows (``attack="first-layer"`` with ``num_examples`` other than 1): the inputs of units
that fire for one sample, uncertified, through layers the exclusivity attack cannot read."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import DropoutMLP, mixed_precision_gradient

import fedleak
from fedleak import metrics
from fedleak.attacks.first_layer_rows import COMPRESSED_ROUTE, ROUNDED_ROUTE, ROUTE, convex_blends


class ResidualNormMLP(nn.Module):
    """A ReLU layer, a residual block and a LayerNorm before the logits: no chain the exact route reads."""

    def __init__(self, d: int, width: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, width)
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = h + F.relu(self.fc2(h))
        return self.out(self.norm(h))


def _update(data, m: int, seed: int, width: int = 512):
    torch.manual_seed(seed)
    model = ResidualNormMLP(data.x[0].numel(), width, data.num_classes).eval()
    x, y = data.batch(m, seed=seed)
    return model, x, y, fedleak.compute_gradient_update(model, x, y)


@pytest.mark.parametrize("name", ["fashion", "lfw"])
def test_rows_give_exact_inputs_with_their_labels(name, request):
    """Ten classes and two: every input returned is one of the batch's, exactly, with its label; none certified."""
    data = request.getfixturevalue(name)
    model, x, y, update = _update(data, 8, 1)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and len(rec) >= 6
    assert scores.exact.sum() == len(rec) and scores.label_correct[scores.matched >= 0].all()
    assert all(s.route == ROUTE and s.witnesses[0] >= 2 for s in rec.samples)
    assert all("not certified" in s.reason for s in rec.samples)


def test_auto_holds_the_rows_and_searches_the_rest(fashion):
    """Where the exact route cannot read the model, ``auto`` returns the batch from its first-layer rows (all of a
    batch of 8 here, no search), and where they give part of it, holds those and lets IG search the rest."""
    model, x, y, update = _update(fashion, 8, 1, width=1024)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False)
    assert rec.attack == "auto:first-layer" and len(rec) == 8 and metrics.match(rec, x, y).exact.all()
    model, x, y, update = _update(fashion, 32, 2)
    rows = fedleak.reconstruct(model, update, attack="first-layer")
    assert 1 <= len(rows) < 32
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False, iterations=3)
    assert rec.attack == "auto:first-layer+ig" and len(rec) == 32
    assert torch.equal(rec.inputs[: len(rows)], rows.inputs) and all(s.route == ROUTE for s in rec.samples[: len(rows)])


def test_bad_row_options_are_refused(fashion):
    model, x, y, update = _update(fashion, 2, 0)
    with pytest.raises(fedleak.FedleakError, match="group_tol must lie in"):
        fedleak.reconstruct(model, update, attack="first-layer", group_tol=2.0)


class UserNet(nn.Module):
    """A user's MLP, with ``x.view`` and ``F.relu``."""

    def __init__(self, d: int, width: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def _steps(data, model, m: int, seed: int, steps: int, declared: bool, **sgd):
    """A FedAvg client's weights after ``steps`` full-batch steps of ``torch.optim.SGD(**sgd)`` on a batch of ``m``,
    its local steps declared or not."""
    x, y = data.batch(m, seed=seed)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), **sgd)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        opt.step()
    update = fedleak.WeightUpdate(before={k: v.clone() for k, v in model.state_dict().items()},
                                  after={k: v.detach().clone() for k, v in trained.state_dict().items()},
                                  num_examples=m, local_steps=steps if declared else None)
    return x, y, update


@pytest.mark.parametrize("steps, declared, sgd", [(3, False, {"lr": 0.05}), (3, True, {"lr": 0.05, "momentum": 0.9}),
                                                  (5, False, {"lr": 0.1})])
def test_weight_change_of_several_steps(steps, declared, sgd, fashion):
    """Over several local steps (declared or not, with momentum or not) the exclusivity attack certifies nothing and
    its rows' inputs come with reasons that cannot tell; the first layer's rows still give the inputs exactly."""
    torch.manual_seed(0)
    model = UserNet(784, 1024, 10)
    x, y, update = _steps(fashion, model, 8, 1, steps, declared, **sgd)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and len(rec) >= 6 and scores.exact.sum() == len(rec)
    assert scores.label_correct[scores.matched >= 0].sum() >= len(rec) - 1  # a label off a group of 2-3 rows may miss
    assert all("several local steps" in s.reason for s in rec.samples)


def test_two_classes_of_several_steps_return_nothing(lfw):
    """On two classes a several-step update's rows agree on blends as often as on samples: nothing is returned,
    and the reason says why; declared as one step, the rows are read with the scale check."""
    torch.manual_seed(0)
    model = UserNet(lfw.x[0].numel(), 1024, 2)
    x, y, update = _steps(lfw, model, 8, 1, 3, False, lr=0.05)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) == 0 and "blends of samples" in rec.missing_reason
    x, y, update = _steps(lfw, model, 8, 1, 1, True, lr=0.05)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) >= 5 and metrics.match(rec, x, y).exact.sum() == len(rec)


def test_auto_reads_a_several_step_change_from_its_rows(fashion):
    """``auto`` on a 3-step update (not declared: the exact route runs and certifies nothing; declared: it is
    skipped) holds the rows' inputs exactly and searches only for the rest."""
    torch.manual_seed(0)
    model = UserNet(784, 512, 10)
    for declared in (False, True):
        x, y, update = _steps(fashion, model, 16, 2, 3, declared, lr=0.05)
        rows = fedleak.reconstruct(model, update, attack="first-layer")
        assert 1 <= len(rows) < 16
        rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False, iterations=2)
        assert rec.attack == "auto:first-layer+dlm+" and len(rec) == 16
        assert torch.equal(rec.inputs[: len(rows)], rows.inputs) and metrics.match(rows, x, y).exact.sum() == len(rows)


def test_an_adam_clients_rows_give_signs_and_are_not_returned(fashion):
    """Adam divides each entry's step by its own running magnitude: a unit exclusive to one sample moves its row by
    ``sign(x)`` times a step, so its rows agree on a sign pattern, not on the input. Nothing is returned, the reason
    says why, and ``auto`` searches the whole batch."""
    torch.manual_seed(0)
    model = UserNet(784, 512, 10)
    x, y = fashion.batch(8, seed=0)
    update = fedleak.fedavg_update(model, x, y, lr=1e-3, local_steps=3, optimizer="adam")
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) == 0 and "sign patterns" in rec.missing_reason
    rec = fedleak.reconstruct(model, update, attack="auto", budget=5, progress=False, iterations=2)
    assert rec.attack == "auto:dlm+"


def test_convex_blends_are_told_from_samples():
    """A point between samples (what the rows of units firing for samples of one label agree on) is a blend; the
    samples are not, not even with blends of themselves among the others. A point beyond a sample (coefficients of
    both signs) is not caught, and puts that sample between it and another: the sample is left out with it."""
    torch.manual_seed(0)
    x = torch.rand(4, 50, dtype=torch.float64)
    X = torch.cat([x, (0.3 * x[0] + 0.7 * x[1])[None], (0.2 * x[1] + 0.5 * x[2] + 0.3 * x[3])[None],
                   (1.5 * x[0] - 0.5 * x[2])[None]])
    assert convex_blends(X, list(range(6))) == {4, 5}
    assert convex_blends(X, [0, 1, 4]) == {4} and convex_blends(X, [0, 4]) == set()
    assert convex_blends(X, list(range(7))) == {0, 4, 5}


def test_auto_adds_the_rows_to_what_the_exact_route_read(fashion):
    """A local epoch of mini-batches, its steps not declared: the exact route reads the first mini-batch's samples
    exactly (their gradients were taken at the weights sent), 4 of the 16 reported at one unknown factor, which 4
    blends of 4 near-copies would give as well: uncertified; the first layer's rows give more, held after them."""
    torch.manual_seed(0)
    model = UserNet(784, 1024, 10)
    x, y = fashion.batch(16, seed=0)
    update = fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=4, batch_size=4)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=10, progress=False, iterations=2)
    scores = metrics.match(rec, x, y)
    assert rec.attack == "auto:exclusivity+first-layer+dlm+" and scores.false_certificates == 0
    read = sum(route.endswith("sample or blend)") for route in rec.routes)
    assert rec.num_certified == 0 and read >= 1 and rec.routes.count(ROUTE) >= 3
    assert any("the exact route read" in n and "exactly, uncertified" in n for n in rec.notes)
    held = read + rec.routes.count(ROUTE)
    assert metrics.match(replace(rec, inputs=rec.inputs[:held], labels=rec.labels[:held],
                                 certified=rec.certified[:held], samples=rec.samples[:held]), x, y).exact.sum() == held


def test_rows_of_a_sparsified_update_start_the_search_instead_of_being_held(digits):
    """Pruning drops entries of the rows themselves: their inputs are near the samples, not exact. The first-layer
    attack says so in every reason and names another route; auto starts DLM+ from them instead of holding them."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(4, seed=77)
    clean = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=1)
    pruned = fedleak.defend_update(clean, fedleak.make_defense("gradient-pruning", ratio=0.75), seed=0)
    rows = fedleak.reconstruct(model, pruned, attack="first-layer")
    assert len(rows) >= 1 and set(rows.routes) == {COMPRESSED_ROUTE}
    assert all("looks sparsified" in s.reason for s in rows.samples)
    assert not metrics.match(rows, x, y).exact.all()  # dropped entries read as 0: not the samples
    rec = fedleak.reconstruct(model, pruned, attack="auto", iterations=20, budget=None, progress=False)
    assert ROUTE not in rec.routes and COMPRESSED_ROUTE not in rec.routes and len(rec) == 4
    assert any("starting the search" in n for n in rec.notes)
    # the clean update's rows are the samples' and are held
    assert set(fedleak.reconstruct(model, clean, attack="first-layer").routes) == {ROUTE}


def _rounded_gradient(model, x, y, how: str) -> list[torch.Tensor]:
    """The client's gradient as ``model.parameters()`` lists it: sent in float16 or bfloat16, or computed under
    autocast (bfloat16)."""
    if how == "autocast":
        return mixed_precision_gradient(model, x, y, torch.bfloat16)
    return [g.to(getattr(torch, how)) for g in fedleak.compute_gradient_update(model, x, y).gradients.values()]


@pytest.mark.parametrize("how", ["float16", "bfloat16", "autocast"])
def test_rows_of_a_rounded_update_give_the_samples_to_its_rounding(fashion, how):
    """A gradient sent in half precision, or computed under autocast, is known to that format's rounding only: its
    rows agree to it, not to float32's 1e-4 (before, no two rows agreed and nothing came back). Every sample comes
    back within a few of the format's epsilons, uncertified, with its label, and the reasons say why."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10).eval()
    x, y = fashion.batch(4, seed=4)
    eps = torch.finfo(torch.float16 if how == "float16" else torch.bfloat16).eps
    for reported in (4, None):
        update = fedleak.read_update(model, _rounded_gradient(model, x, y, how), num_examples=reported)
        rec = fedleak.reconstruct(model, update, attack="first-layer")
        scores = metrics.match(rec, x, y)
        assert len(rec) == 4 and rec.num_certified == 0 and (scores.matched >= 0).all()
        assert float(scores.max_abs_error.max()) <= 4 * eps and scores.label_correct.all()
        assert all(s.route == ROUNDED_ROUTE and "known to its rounding only" in s.reason for s in rec.samples)


@pytest.mark.parametrize("how", ["bfloat16", "autocast"])
def test_one_sample_of_a_rounded_update_is_read_off_all_its_rows(fashion, how):
    """One sample's gradient in a coarse format: its input is every row's, weighed together, to the rounding; the
    whole gradient fits it to that rounding, which is no certificate of an exact input."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10).eval()
    x, y = fashion.batch(1, seed=5)
    update = fedleak.read_update(model, _rounded_gradient(model, x, y, how), num_examples=1)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) == 1 and rec.num_certified == 0 and rec.samples[0].route == ROUNDED_ROUTE
    assert float((rec.inputs.reshape(x.shape) - x).abs().max()) <= 2 * torch.finfo(torch.bfloat16).eps
    assert "fits the update to within it" in rec.samples[0].reason


def test_rows_of_a_rounded_two_class_update_return_nothing(lfw):
    """On two classes a blend of samples fits a class on its rows at a scale of its own, and only the scale test
    tells it from a sample; a bfloat16 update loosens that test to its rounding (a third of the inputs it let
    through on these faces were blends), so the rows return nothing and say why."""
    torch.manual_seed(0)
    model = DropoutMLP(625, 1024, 2).eval()
    x, y = lfw.batch(8, seed=101)
    update = fedleak.read_update(model, _rounded_gradient(model, x, y, "bfloat16"), num_examples=8)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) == 0 and "on two classes a blend of samples" in rec.missing_reason
    assert "the update is in bfloat16" in rec.missing_reason


class FunctionalUserNet(nn.Module):
    """``UserNet`` with its weights held as parameters and applied with F.linear (meta-learning code's style)."""

    def __init__(self, net: UserNet) -> None:
        super().__init__()
        self.w1, self.b1 = (nn.Parameter(p.detach().clone()) for p in (net.fc1.weight, net.fc1.bias))
        self.w2, self.b2 = (nn.Parameter(p.detach().clone()) for p in (net.fc2.weight, net.fc2.bias))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x.view(x.size(0), -1), self.w1, self.b1)), self.w2, self.b2)


def test_the_rows_of_a_functional_first_layer_give_what_its_twin_s_give(fashion):
    torch.manual_seed(0)
    twin = UserNet(784, 1024, 10)
    model = FunctionalUserNet(twin)
    x, y, update = _steps(fashion, model, 8, 1, 3, False, lr=0.05)
    _, _, twin_update = _steps(fashion, twin, 8, 1, 3, False, lr=0.05)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    theirs = fedleak.reconstruct(twin, twin_update, attack="first-layer")
    assert len(rec) == len(theirs) >= 6 and metrics.match(rec, x, y).exact.sum() == len(rec)
    assert torch.equal(rec.inputs.flatten(1), theirs.inputs.flatten(1))
    assert rec.labels.tolist() == theirs.labels.tolist()


def _other_loss_update(data, m: int, outputs: int, loss: str, seed: int = 0, noise: float = 0.0):
    """A batch's gradient under a loss that is no softmax cross-entropy: multi-label binary cross-entropy on
    multi-hot targets, or MSE on real-valued targets, over ``outputs`` outputs."""
    torch.manual_seed(seed)
    model = ResidualNormMLP(data.x[0].numel(), 512, outputs).eval()
    x, y = data.batch(m, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = model(x)
    value = (F.binary_cross_entropy_with_logits(out, (torch.rand(m, outputs, generator=gen) > 0.5).float())
             if loss == "bce" else F.mse_loss(out, torch.randn(m, outputs, generator=gen)))
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(value, list(model.parameters()))
    grads = [g + noise * torch.randn(g.shape, generator=gen) for g in grads]
    return model, x, fedleak.GradientUpdate(dict(zip(names, grads)), num_examples=m)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_rows_under_another_loss_give_the_batch_s_inputs(fashion, loss):
    """A client training with multi-label BCE or MSE sends a gradient whose output bias does not sum to zero, and no
    class's cross-entropy gradient fits its rows: the rows that agree are returned all the same (with three outputs
    or more), each one of the batch's inputs exactly, uncertified, the reason saying why (nothing was returned)."""
    model, x, update = _other_loss_update(fashion, 8, 5, loss)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert rec.num_certified == 0 and len(rec) >= 6
    nearest = torch.cdist(rec.inputs.flatten(1).double(), x.flatten(1).double()).min(1).values
    assert (nearest < 1e-4).all()
    assert all("sums to" in s.reason and "a guess" in s.reason for s in rec.samples)


def test_rows_under_another_loss_with_two_outputs_or_noise_return_nothing(fashion):
    """Two outputs: the agreement of the rows is all that would tell a sample from a blend, which is not enough;
    a noised update's rows agree on nothing."""
    model, _, update = _other_loss_update(fashion, 8, 2, "mse")
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert len(rec) == 0 and "one or two outputs" in rec.missing_reason
    model, _, update = _other_loss_update(fashion, 8, 5, "bce", noise=1e-6)
    assert len(fedleak.reconstruct(model, update, attack="first-layer")) == 0
