"""One step of an adaptive optimizer told from a weight change (fedleak.adaptive_step): said in the update's
description, which then rules out the exact route, and given as the reason the exact and first-layer attacks rebuild
nothing; SGD's changes, with momentum or several steps, are not taken for one."""

import copy

import pytest
import torch
from torch.nn import functional as F

import fedleak
from fedleak.adaptive_step import adaptive_step
from fedleak.update_kind import describe_update

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),  # (its decay alone moves the rest)
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    data = fedleak.load_dataset("digits")
    return fedleak.make_mlp((1, 8, 8), [256], 10), data.x[:8], data.y[:8]


def _stepped(model, x, y, name: str, steps: int = 1) -> fedleak.WeightUpdate:
    client = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in client.state_dict().items()}
    opt = OPTIMIZERS[name](client.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(client(x), y).backward()
        opt.step()
    return fedleak.WeightUpdate(before, {k: v.detach().clone() for k, v in client.state_dict().items()},
                                num_examples=len(x))


@pytest.mark.parametrize("name", ["adam", "adamw", "rmsprop", "adagrad"])
def test_an_adaptive_step_is_told_and_rebuilds_nothing(setting, name):
    model, x, y = setting
    update = _stepped(model, x, y, name)
    step = adaptive_step(update.delta())
    assert step is not None and step.share > 0.5
    kind = describe_update(update, model)
    assert kind.adaptive == pytest.approx(step.size) and not kind.exact_route_possible
    assert "an adaptive optimizer's step" in kind.summary()
    for attack in ("exclusivity", "first-layer"):
        rec = fedleak.reconstruct(model, update, attack=attack)
        assert len(rec) == 0 and "adaptive optimizer" in rec.summary()


@pytest.mark.parametrize("name, steps", [("sgd", 1), ("sgd", 3), ("momentum", 3)])
def test_sgd_is_not_taken_for_an_adaptive_step(setting, name, steps):
    model, x, y = setting
    update = _stepped(model, x, y, name, steps)
    assert adaptive_step(update.delta()) is None and describe_update(update, model).adaptive is None


def test_an_adaptive_step_passed_as_a_gradient_is_told_from_clipping_by_value(setting):
    """A client's change over the rate the server set, read as a gradient (a federation's uploaded change): Adam's
    entries sit within ``eps / |g|`` of one size, a few at its largest exactly, which the value-clip reading took for
    entries clipped at 1 ("clipped by value at ±1"). A gradient clipped by value holds its bound exactly."""
    model, x, y = setting
    update = _stepped(model, x, y, "adam")
    lr = 1e-3
    pseudo = fedleak.GradientUpdate({k: v / lr for k, v in update.delta().items()}, num_examples=len(x))
    step = adaptive_step(pseudo.gradients)
    assert step is not None and not step.one_value
    rec = fedleak.reconstruct(model, pseudo, attack="exclusivity")
    assert len(rec) == 0 and "adaptive optimizer" in rec.summary() and "clipped by value" not in rec.summary()
    clipped = fedleak.compute_gradient_update(model, x, y)
    bound = 0.25 * max(float(g.abs().max()) for g in clipped.gradients.values())
    clipped = fedleak.GradientUpdate({k: g.clamp(-bound, bound) for k, g in clipped.gradients.items()},
                                     num_examples=len(x))
    told = adaptive_step(clipped.gradients)
    assert told is None or told.one_value
    assert "clipped by value" in fedleak.reconstruct(model, clipped, attack="exclusivity").summary()
    # a gradient quantised to 4 bits has most of its largest entries on one level, exactly: not an adaptive step
    quantised = fedleak.defended_gradient(model, x, y, "quantize:bits=4", seed=0).update
    level = adaptive_step(quantised.gradients)
    assert level is None or level.one_value
    assert "adaptive optimizer" not in fedleak.reconstruct(model, quantised, attack="exclusivity").summary()
