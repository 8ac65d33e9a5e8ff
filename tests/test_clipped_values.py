"""Clipping by value read off a gradient: what ``clip_grad_value_`` leaves, and what natural gradients do not."""

import pytest
import torch

import fedleak
from fedleak.clipped_values import read_value_clip


def _clipped(model, x, y, fraction):
    update = fedleak.compute_gradient_update(model, x, y)
    top = max(float(g.abs().max()) for g in update.gradients.values())
    for n, p in model.named_parameters():
        p.grad = update.gradients[n].clone()
    torch.nn.utils.clip_grad_value_(model.parameters(), fraction * top)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, fraction * top


@pytest.mark.parametrize("fraction", [0.3, 0.02])
def test_clip_grad_value_is_read_with_its_bound(fashion, fraction):
    model = fedleak.make_mlp(fashion.input_shape, (256,), 10, seed=0)
    x, y = fashion.batch(8, seed=2)
    grads, bound = _clipped(model, x, y, fraction)
    clip = read_value_clip(grads)
    assert clip is not None and clip.bound == pytest.approx(bound, rel=1e-6) and clip.units >= 2
    assert clip.entries == sum(int(clip.censored(g).sum()) for g in grads.values())
    assert "clip_grad_value_" in clip.describe()


def test_natural_gradients_are_not_read_as_clipped(fashion, lfw):
    """Ten classes, two classes (whose output rows are each other's negatives and tie at the top), a CNN, one sample
    (whose pixels at 1.0 repeat a bias entry along its row), standardised inputs; and compressed updates whose top
    level many units share (sign, 8-bit quantisation)."""
    for data, classes in ((fashion, 10), (lfw, 2)):
        for seed in range(2):
            models = [fedleak.make_mlp(data.input_shape, (128,), classes, seed=seed),
                      fedleak.make_convnet(data.input_shape, classes, channels=(4,), kernel=3, padding=1,
                                           fc_widths=(64,), seed=seed)]
            for model in models:
                for m in (1, 4):
                    x, y = data.batch(m, seed=seed)
                    for inputs in (x, (x - x.mean()) / x.std()):
                        update = fedleak.compute_gradient_update(model, inputs, y)
                        assert read_value_clip(update.gradients) is None
    model = fedleak.make_mlp(fashion.input_shape, (128,), 10, seed=0)
    x, y = fashion.batch(4, seed=0)
    for spec in ("sign", "quantize:bits=8"):
        assert read_value_clip(fedleak.defended_gradient(model, x, y, spec, seed=0).update.gradients) is None


def test_one_unit_at_the_top_is_only_a_hypothesis(fashion):
    model = fedleak.make_mlp(fashion.input_shape, (128,), 10, seed=0)
    x, y = fashion.batch(1, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    assert read_value_clip(grads) is None
    top = read_value_clip(grads, min_units=1)
    assert top is not None and top.units == 1 and top.bound == max(float(g.abs().max()) for g in grads.values())
    assert "read as the bound" in top.describe()
