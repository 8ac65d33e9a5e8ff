"""The plan tells a FedSGD gradient from a multi-step FedAvg update, and advises accordingly."""

from __future__ import annotations

import pytest
import torch
from user_models import DropoutMLP

import fedleak


@pytest.fixture(scope="module")
def setting(digits):
    model = fedleak.make_mlp((1, 8, 8), [256], 10, seed=0)
    x, y = digits.batch(4, seed=3)
    return model, x, y


def test_gradient_and_multi_step_weight_updates_are_told_apart(setting, digits):
    model, x, y = setting
    gradient = fedleak.compute_gradient_update(model, x, y)
    weights = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=5, batch_size=2, reveal_local_steps=True)
    g = fedleak.plan(model, gradient, digits, max_samples=300)
    w = fedleak.plan(model, weights, digits, max_samples=300)

    assert g.update.kind == "gradient" and g.batch_size == 4  # the update's batch size is the one judged
    assert w.update.kind == "multi-step" and w.update.local_steps == 5
    assert g.route == "applies" and w.route == "cannot"
    assert "exclusivity" in g.recommended and "exclusivity" not in w.recommended
    assert "dlm+" in w.recommended and "dlm+" not in g.recommended
    # the first Linear layer's rows still give inputs over several steps: recommended, uncertified, and auto says so
    advice = {a.name: a for a in w.attacks}
    assert "first-layer" in w.recommended and not advice["first-layer"].certified
    assert "any number of local steps" in advice["first-layer"].why
    assert "first Linear layer's rows" in advice["auto"].why
    assert w.proposal is None  # no change of the model makes a multi-step update certifiable
    assert g.to_text().splitlines()[2:5] != w.to_text().splitlines()[2:5]
    assert "update    FedSGD gradient: 4 examples" in g.to_text()
    assert "multi-step FedAvg update" in w.to_text() and "5 local steps" in w.verdict
    # the layer arithmetic is the same model's either way
    assert g.dense[0].max_batch_size == w.dense[0].max_batch_size


def test_one_step_weight_update_keeps_the_exact_route(setting, digits):
    model, x, y = setting
    one = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1, reveal_local_steps=True)
    p = fedleak.plan(model, one, digits, max_samples=300)
    assert p.update.kind == "one-step" and p.route == "applies" and "exclusivity" in p.recommended
    advice = {a.name: a for a in p.attacks}
    assert advice["dlg"].recommended is False and advice["dlm"].why


def test_summed_loss_and_weight_decay_are_named_in_the_advice(setting, digits):
    import torch
    import torch.nn.functional as F

    model, x, y = setting
    loss = F.cross_entropy(model(x), y, reduction="sum")
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    summed = fedleak.plan(model, fedleak.GradientUpdate(grads, num_examples=4), digits, max_samples=300)
    advice = {a.name: a for a in summed.attacks}["exclusivity"]
    assert summed.update.summed and "loss_reduction='sum'" in advice.why
    decayed = fedleak.plan(model, fedleak.fedavg_update(model, x, y, lr=0.1, optimizer="momentum", weight_decay=1e-2),
                           digits, max_samples=300)
    assert decayed.update.weight_decay and not decayed.update.noised and "SGD weight decay" in decayed.to_text()
    # a batch the route does not cover, steps not declared: auto reads the first layer's rows where the exact route
    # certifies nothing (for a gradient there is nothing of the kind to say)
    xs, ys = digits.batch(32, seed=3)
    big = fedleak.plan(model, fedleak.fedavg_update(model, xs, ys, lr=0.1), digits, max_samples=300)
    assert big.route != "applies" and "first Linear layer's rows" in {a.name: a for a in big.attacks}["auto"].why
    grad = fedleak.plan(model, fedleak.compute_gradient_update(model, xs, ys), digits, max_samples=300)
    assert "first Linear layer's rows" not in {a.name: a for a in grad.attacks}["auto"].why


def test_a_model_the_route_cannot_read_still_gets_a_plan():
    from user_models import ResidualMLP

    p = fedleak.plan(ResidualMLP(), batch_sizes=[2])
    assert p.route == "cannot" and not p.layers and "joins 2 branches" in p.verdict
    assert "ig" in p.recommended and "exclusivity" not in p.recommended
    assert p.to_text().startswith("VERDICT: the exact route cannot apply to ResidualMLP")


def test_a_frozen_output_layer_keeps_the_exact_route_off(digits):
    """A FedBABU client's update holds nothing of its frozen output layer, which the exact route reads: the plan
    names the layer and recommends what reads the rest (it recommended the exact attack, which then refused)."""
    from user_models import FrozenHeadMLP

    model = FrozenHeadMLP().eval()
    x, y = digits.batch(4, seed=0)
    p = fedleak.plan(model, fedleak.compute_gradient_update(model, x, y))
    assert p.route == "cannot" and "frozen" in p.verdict and "fc2.weight" in p.verdict
    assert "exclusivity" not in p.recommended and "auto" in p.recommended


def test_a_model_without_a_hidden_dense_relu_gets_a_plan_saying_so(digits):
    """conv -> ReLU -> Linear: the route reads the model but has no exclusively activated neurons to read; the
    plan says so (it was an error), and keeps what it noted of the update (a FedAvg reply read as weights)."""
    import copy

    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)).eval()
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(client(digits.x[:4]), digits.y[:4]).backward()
    opt.step()
    p = fedleak.plan(model, list(client.state_dict().values()), batch_sizes=[2])
    assert p.route == "cannot" and "no hidden ReLU layer in its dense head" in p.verdict
    assert "dlm+" in p.recommended and "exclusivity" not in p.recommended  # a weight update's optimisation attack
    assert any("the client's weights" in note for note in p.notes) and p.update.kind == "weights"


def test_a_model_with_dropout_is_judged_for_eval_mode_clients(digits):
    """The counts are those of the eval-mode network; the verdict says that clients training with Dropout active
    get nothing certified (and says nothing of it for a model without Dropout)."""
    x, y = digits.batch(4, seed=3)
    with_dropout = fedleak.plan(DropoutMLP(64, 256, 10).eval(), None, (x, y), batch_sizes=4)
    assert "clients that train with the model's Dropout or BatchNorm active" in with_dropout.verdict
    plain = fedleak.plan(fedleak.make_mlp((1, 8, 8), [256], 10, seed=0), None, (x, y), batch_sizes=4)
    assert "eval mode" not in plain.verdict


def test_a_gradient_clipped_by_value_gets_its_own_verdict(setting, digits):
    model, x, y = setting
    update = fedleak.defended_gradient(model, x, y, "value-clipping:bound=0.001", seed=0).update
    p = fedleak.plan(model, update, digits, max_samples=300)
    assert p.route == "cannot" and "clipped by value at ±0.001" in p.verdict
    assert "first-layer attack still certifies a one-sample gradient" in p.verdict
    advice = {a.name: a for a in p.attacks}
    assert advice["auto"].recommended and "clipping its simulated gradients alike" in advice["auto"].why
    assert not advice["exclusivity"].recommended


class Clamped(torch.nn.Module):
    """A GELU MLP (which the exact route does not read) that clamps its input first."""

    def __init__(self, clamp: bool) -> None:
        super().__init__()
        self.clamp = clamp
        self.fc1, self.fc2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 10)

    def forward(self, x):
        x = x.clamp(0, 1) if self.clamp else x
        return self.fc2(torch.nn.functional.gelu(self.fc1(x.flatten(1))))


def test_the_first_layer_advice_says_when_an_op_before_the_layer_keeps_it_uncertified(digits):
    x, y = digits.batch(1, seed=3)
    advice = {}
    for clamp in (False, True):
        model = Clamped(clamp).eval()
        plan = fedleak.plan(model, fedleak.compute_gradient_update(model, x, y), (x, y))
        advice[clamp] = {a.name: a for a in plan.attacks}["first-layer"]
    assert advice[False].certified and "holds it exactly" in advice[False].why
    assert not advice[True].certified and "'clamp'" in advice[True].why


def test_a_gradient_of_another_loss_gets_auto_s_reading_of_its_rows(digits):
    """A multi-label BCE gradient sums its output bias away from zero: the exact route cannot certify it, and auto's
    advice says it holds the inputs the first layer's rows agree on before its search."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x, _ = digits.batch(4, seed=0)
    targets = (torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    loss = F.binary_cross_entropy_with_logits(model(x), targets)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    p = fedleak.plan(model, fedleak.GradientUpdate(grads, num_examples=4))
    (auto,) = [a for a in p.attacks if a.name == "auto"]
    assert auto.recommended and "rows agree on" in auto.why and "another loss" in auto.why
