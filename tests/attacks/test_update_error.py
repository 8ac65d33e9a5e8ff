"""An update's known transport error (e.g. secure aggregation's quantization) widens the certificates' tolerances:
a small error changes nothing, a large one certifies nothing, and no certificate is ever false."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak import metrics


@pytest.fixture(scope="module")
def batch():
    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=0)
    x, y = data.batch(8, seed=3)
    return data, model, x, y


def _quantized(update: fedleak.GradientUpdate, step: float) -> fedleak.GradientUpdate:
    """Every entry rounded to a grid of ``step``: an error of at most ``step / 2`` per entry."""
    grads = {k: torch.round(v.double() / step) * step for k, v in update.gradients.items()}
    return fedleak.GradientUpdate({k: v.float() for k, v in grads.items()}, num_examples=update.num_examples,
                                  error=step / 2 + 1e-7 * max(float(v.abs().max()) for v in grads.values()))


@pytest.mark.parametrize("attack", ["exclusivity", "trap-weights"])
def test_error_bound_never_lets_a_certificate_be_false(batch, attack):
    data, model, x, y = batch
    if attack == "trap-weights":
        model = fedleak.trap_weights(model, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    exact = fedleak.reconstruct(model, update, attack=attack)
    assert exact.num_certified > 0
    counts = []
    for step in (1e-9, 1e-6, 1e-3):
        rec = fedleak.reconstruct(model, _quantized(update, step), attack=attack)
        scores = metrics.match(rec, x, y, data_range=data.value_range)
        assert scores.false_certificates == 0, (step, rec.summary())
        counts.append(rec.num_certified)
    assert counts[-1] < exact.num_certified  # a coarse grid certifies less ...
    assert counts == sorted(counts, reverse=True)  # ... and never more than a finer one


def test_a_cnn_under_a_transport_error_states_it_in_its_bounds():
    """A known transport error enters the features' error the conv inversion starts from
    (:mod:`fedleak.attacks.exact.feature_noise`): under a small one a CNN certifies what it certifies without,
    each certificate stating a larger bound that its sample keeps; a coarse one certifies nothing, none false."""
    x, y = fedleak.load_dataset("lfw").batch(2, seed=3)
    x = x[..., :12, :12]
    model = fedleak.make_convnet((1, 12, 12), 2, channels=(6,), fc_widths=(64,), seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    plain = fedleak.reconstruct(model, update)
    assert plain.num_certified == 2
    counts, bounds = [], []
    for error in (1e-12, 1e-8, 1e-3):
        rec = fedleak.reconstruct(model, fedleak.GradientUpdate(dict(update.gradients), num_examples=2, error=error))
        assert metrics.match(rec, x, y).false_certificates == 0, (error, rec.summary())
        counts.append(rec.num_certified)
        bounds.append(rec.error_bounds[rec.certified])
    assert counts[:2] == [2, 2] and counts[-1] == 0
    assert bool((bounds[0] > plain.error_bounds).all()) and bool((bounds[1] > bounds[0]).all())


def test_error_is_checked_and_saved(tmp_path):
    g = {"w": torch.ones(3)}
    with pytest.raises(fedleak.UpdateError, match="error bound"):
        fedleak.GradientUpdate(g, error=float("nan"))
    with pytest.raises(fedleak.UpdateError, match="error bound"):
        fedleak.WeightUpdate({"w": torch.ones(3)}, {"w": torch.zeros(3)}, error=-1.0)
    path = fedleak.save_update(fedleak.GradientUpdate(g, num_examples=2, error=2.5e-9), tmp_path / "u.safetensors")
    assert fedleak.load_update(path).error == 2.5e-9
