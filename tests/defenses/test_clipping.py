"""Norm clipping per layer, per tensor and of the whole update."""

from __future__ import annotations

import math

import pytest
import torch

from fedleak.defenses import Accounting, make_defense, parse_defense
from fedleak.errors import OptionError


def update() -> dict[str, torch.Tensor]:
    # fc1: weight norm 3, bias norm 4 (layer norm 5); fc2: norm 0.5; out: zero
    return {"fc1.weight": torch.tensor([[3.0, 0.0]]), "fc1.bias": torch.tensor([4.0]),
            "fc2.weight": torch.tensor([[0.3, 0.4]]), "out.weight": torch.zeros(2, 2)}


def apply(**params) -> dict[str, torch.Tensor]:
    return make_defense("clipping", **params).apply(update(), None, torch.Generator())


def test_per_layer_clipping_scales_a_module_s_parameters_together():
    out = apply(bound=1.0)  # per="layer"
    torch.testing.assert_close(out["fc1.weight"], torch.tensor([[0.6, 0.0]]))
    torch.testing.assert_close(out["fc1.bias"], torch.tensor([0.8]))  # the same factor 1/5
    assert torch.equal(out["fc2.weight"], update()["fc2.weight"])  # under the bound
    assert torch.equal(out["out.weight"], torch.zeros(2, 2))


def test_per_tensor_and_whole_update_clipping():
    out = apply(bound=1.0, per="tensor")
    torch.testing.assert_close(out["fc1.weight"], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out["fc1.bias"], torch.tensor([1.0]))
    assert torch.equal(out["fc2.weight"], update()["fc2.weight"])
    out = apply(bound=1.0, per="update")
    total = math.sqrt(25 + 0.25)
    for k, t in update().items():
        torch.testing.assert_close(out[k], t / total)
    norm = math.sqrt(sum(float(t.square().sum()) for t in out.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)


def test_input_is_untouched_and_no_privacy():
    u = update()
    make_defense("clipping", bound=0.1).apply(u, None, torch.Generator())
    assert all(torch.equal(u[k], update()[k]) for k in u)
    assert make_defense("clipping", bound=0.1).privacy(Accounting()) is None


@pytest.mark.parametrize("per", ["layer", "tensor", "update"])
def test_observe_is_the_same_clipping_and_differentiable(per):
    d = make_defense("clipping", bound=1.0, per=per)
    sim = {k: t.clone().requires_grad_(True) for k, t in update().items()}
    out = d.observe(sim, {})
    expected = d.apply(update(), None, torch.Generator())
    for k in out:
        torch.testing.assert_close(out[k].detach(), expected[k])
    (out["fc1.weight"].sum() + out["out.weight"].sum()).backward()
    assert sim["fc1.weight"].grad is not None and torch.isfinite(sim["fc1.weight"].grad).all()
    assert torch.isfinite(sim["out.weight"].grad).all()  # a zero group gives no NaN


@pytest.mark.parametrize("params, bad", [(dict(bound=0.0), "bound"), (dict(bound=-1.0), "bound"),
                                         (dict(bound=1.0, per="row"), "per")])
def test_bad_parameters(params, bad):
    with pytest.raises(OptionError, match=bad):
        make_defense("clipping", **params)


def test_bad_parameters_from_a_spec():
    with pytest.raises(OptionError, match="per"):
        parse_defense("clipping:bound=1,per=neuron")
    assert parse_defense("clipping:bound=0.5,per=tensor").bound == 0.5


def test_value_clipping_is_torch_s_clip_grad_value():
    """What ``torch.nn.utils.clip_grad_value_`` leaves in a model's gradients, entry for entry."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    torch.nn.functional.cross_entropy(model(torch.rand(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bound = 0.5 * max(float(g.abs().max()) for g in grads.values())
    torch.nn.utils.clip_grad_value_(model.parameters(), bound)
    out = make_defense("value-clipping", bound=bound).apply(grads, None, torch.Generator())
    assert all(torch.equal(out[n], p.grad) for n, p in model.named_parameters())
    assert any(bool((grads[n] != out[n]).any()) for n in grads)  # the bound cut something


def test_value_clipping_forward_model_is_the_same_cut():
    d = parse_defense("value-clipping:bound=0.5")
    sim = {k: t.clone().requires_grad_(True) for k, t in update().items()}
    out = d.observe(sim, {})
    assert torch.equal(out["fc1.bias"].detach(), torch.tensor([0.5]))
    assert torch.equal(out["fc2.weight"].detach(), torch.tensor([[0.3, 0.4]]))
    out["fc2.weight"].sum().backward()
    assert torch.equal(sim["fc2.weight"].grad, torch.ones(1, 2))
    with pytest.raises(OptionError, match="bound"):
        make_defense("value-clipping", bound=0.0)
