"""Soteria: the pruned representation features, against a per-sample Jacobian computed here."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from user_models import FlowerNet

import fedleak
from fedleak.defenses import ClientBatch, defended_gradient, make_defense, parse_defense
from fedleak.defenses.soteria import (
    feature_scores,
    jacobian_row_norms_forward,
    jacobian_row_norms_reverse,
    representation,
)
from fedleak.errors import OptionError

pytestmark = pytest.mark.usefixtures("one_thread")  # many small backward passes: a second thread only contends


def reference_scores(model: nn.Module, layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Σ_s ‖∂r_f(x_s)/∂x_s‖ / |r_f(x_s)| over the samples with r_f != 0, from one full Jacobian per sample
    (a feature that is 0 for every sample: inf)."""
    def rep(xs: torch.Tensor) -> torch.Tensor:
        box = []
        handle = layer.register_forward_hook(lambda m, args, out: box.append(args[0]))
        try:
            model(xs.unsqueeze(0))
        finally:
            handle.remove()
        return box[0][0]

    total, active = None, None
    for xs in inputs:
        with torch.backends.mkldnn.flags(enabled=False):  # oneDNN is slow on many one-sample backward passes
            jac = torch.autograd.functional.jacobian(rep, xs).reshape(layer.in_features, -1).double()
        r = rep(xs).detach().double()
        value = torch.where(r == 0, torch.zeros((), dtype=torch.float64), jac.norm(dim=1) / r.abs())
        total = value if total is None else total + value
        active = (r != 0) if active is None else active | (r != 0)
    return torch.where(active, total, torch.tensor(math.inf, dtype=torch.float64))


def check_pruned(model, layer_name, module, x, y, ratio, **params):
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    d = make_defense("soteria", ratio=ratio, **params)
    out = d.apply(grads, ClientBatch(model, x, y), torch.Generator())
    expected = reference_scores(model, module, x)
    torch.testing.assert_close(feature_scores(model, module, x), expected, rtol=1e-4, atol=0)
    count = int(ratio * module.in_features)
    order = torch.argsort(expected, stable=True)
    pruned = order[:count]
    assert expected[order[count]] > expected[order[count - 1]] * (1 + 1e-3)  # float32 rounding cannot swap them
    assert torch.isfinite(expected[pruned]).all()  # the test case prunes no all-zero feature
    key = f"{layer_name}.weight"
    assert not out[key][:, pruned].any()  # exactly these columns are zeroed ...
    kept = torch.ones(module.in_features, dtype=torch.bool)
    kept[pruned] = False
    assert torch.equal(out[key][:, kept], grads[key][:, kept])  # ... the rest is the input
    assert grads[key][:, pruned].any()  # (they were not zero before)
    for name in grads:
        if name != key:
            assert torch.equal(out[name], grads[name])  # bias and every other tensor untouched
    return d, grads, out


def test_soteria_on_an_mlp_defends_the_output_layer_s_input(digits):
    x, y = digits.batch(4, seed=5)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    # default layer: the first Linear after the model's first module with parameters ("1"): the output layer
    d, grads, out = check_pruned(model, "3", model[3], x, y, 0.25)
    sim = {k: v.clone().requires_grad_(True) for k, v in grads.items()}
    seen = d.observe(sim, out)
    assert torch.equal(seen["3.weight"].detach(), out["3.weight"])  # the true update maps to what was sent
    seen["3.weight"].sum().backward()
    mask = (out["3.weight"] != 0).any(0).float().expand_as(out["3.weight"])
    torch.testing.assert_close(sim["3.weight"].grad, mask)


def test_soteria_on_the_flower_cnn_defends_the_first_fc_layer():
    torch.manual_seed(0)
    model = FlowerNet()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 7])
    check_pruned(model, "fc1", model.fc1, x, y, 0.5)  # 400 features after the convolutions
    check_pruned(model, "fc2", model.fc2, x, y, 0.3, layer="fc2")  # a named layer


def test_forward_and_reverse_jacobian_norms_agree(digits):
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 3 * 3, 3)).double()
    xs = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def fn(v):
        return representation(small, small[4], v)

    reverse = jacobian_row_norms_reverse(fn, xs, chunk=16)  # 72 features in 5 chunks
    forward = jacobian_row_norms_forward(fn, xs, chunk=10)  # 36 input numbers in 4 chunks
    torch.testing.assert_close(forward, reverse, rtol=1e-10, atol=1e-12)
    # 72 features from 36 input numbers: feature_scores takes forward mode
    torch.testing.assert_close(feature_scores(small, small[4], xs), reference_scores(small, small[4], xs))


def test_defended_gradient_runs_soteria_with_the_client_batch(digits):
    x, y = digits.batch(3, seed=8)
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    sent = defended_gradient(model, x, y, "soteria:ratio=0.5", seed=0).update.gradients
    zero_columns = int((sent["3.weight"] == 0).all(0).sum())
    assert zero_columns >= 8
    assert torch.equal(sent["1.weight"], fedleak.compute_gradient_update(model, x, y).gradients["1.weight"])


def test_bad_layers_and_ratios(digits):
    x, y = digits.batch(2, seed=0)
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    for layer in ("0", "nope"):
        d = make_defense("soteria", ratio=0.5, layer=layer)
        with pytest.raises(OptionError, match=r"layer.*Linear layers: \['1', '3'\]"):
            d.apply(grads, ClientBatch(model, x, y), torch.Generator())
    with pytest.raises(OptionError, match="batch"):
        make_defense("soteria", ratio=0.5).apply(grads, None, torch.Generator())
    for ratio in (0.0, 1.0, -0.5):
        with pytest.raises(OptionError, match="ratio"):
            make_defense("soteria", ratio=ratio)
    with pytest.raises(OptionError, match="ratio"):
        parse_defense("soteria:ratio=1")
    assert parse_defense("soteria:ratio=0.3,layer=fc1").layer == "fc1"
    assert make_defense("soteria", ratio=0.5).needs_batch


def test_a_batch_of_32_with_1024_features_of_784_inputs(fashion):
    x, y = fashion.batch(32, seed=0)
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    out = make_defense("soteria", ratio=0.5).apply(grads, ClientBatch(model, x, y), torch.Generator())
    pruned = torch.argsort(feature_scores(model, model[3], x), stable=True)[:512]  # the smallest sums
    kept = torch.ones(1024, dtype=torch.bool)
    kept[pruned] = False
    assert not out["3.weight"][:, pruned].any() and torch.equal(out["3.weight"][:, kept], grads["3.weight"][:, kept])


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))  # training mode
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    state = {k: v.clone() for k, v in model.state_dict().items()}
    make_defense("soteria", ratio=0.5).apply(grads, ClientBatch(model, x, y), torch.Generator())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
