"""A rebuilt input's gradient fitted to the update class by class: the residual read off the fit's products is the
residual computed entry by entry (without a clip), or a lower bound of it (with one)."""

import math

import pytest
import torch

import fedleak
import fedleak.nets.float64 as nf
from fedleak.attacks import class_fit as cf
from fedleak.clipped_values import ValueClip


def _explicit(gradients, label, observed):
    fit = cf.class_fit(gradients, label, observed)
    worst = 0.0
    for g, t in zip(gradients.of(label), observed.flat):
        s = fit.scale * g if observed.clip is None else observed.clip.cut(fit.scale * g)
        worst = max(worst, float((t - s).norm() / t.norm()))
    return fit, worst


def test_the_residual_read_off_the_products_is_the_residual(digits, monkeypatch):
    model = fedleak.make_mlp((1, 8, 8), [256], 10, seed=0)
    x, y = digits.batch(2, seed=2)
    one = dict(fedleak.compute_gradient_update(model, x[:1], y[:1]).gradients)
    two = dict(fedleak.compute_gradient_update(model, x, y).gradients)  # no one sample's gradient fits it
    label = int(y[0])
    observed = cf.Observed.of(one, None)
    gradients = cf.ClassGradients(model, x[:1], observed.names)
    own = cf.class_fit(gradients, label, observed)
    assert own.residual < 1e-5 and math.isclose(own.scale, 1.0, rel_tol=1e-5)  # the sample's own gradient
    fit, worst = _explicit(gradients, label, cf.Observed.of(two, None))
    assert fit.scale > 0 and fit.residual > cf.SCREEN_RESIDUAL and math.isclose(fit.residual, worst, rel_tol=1e-6)
    # clipped by value: the entries at the bound only add to the residual, so the screen is a lower bound
    clip = ValueClip(0.5 * max(float(t.abs().max()) for t in two.values()), 2, 2, tuple(two))
    clipped = cf.Observed.of({n: clip.cut(t) for n, t in two.items()}, clip)
    screened = cf.class_fit(gradients, label, clipped)
    monkeypatch.setattr(cf, "SCREEN_RESIDUAL", math.inf)  # every fit computed entry by entry
    full = cf.class_fit(gradients, label, clipped)
    assert screened.residual <= full.residual * (1 + 1e-9) and full.residual > 1e-3
    assert torch.isfinite(torch.tensor(full.residual))


def test_one_pass_gives_the_residual_that_a_second_pass_over_the_update_gives(digits, monkeypatch):
    model = fedleak.make_mlp((1, 8, 8), [256], 10, seed=0)
    x, y = digits.batch(2, seed=2)
    one = dict(fedleak.compute_gradient_update(model, x[:1], y[:1]).gradients)
    two = dict(fedleak.compute_gradient_update(model, x, y).gradients)
    gradients = cf.ClassGradients(model, x[:1], tuple(one))
    label = int(y[0])
    monkeypatch.setattr(cf, "SCREEN_RESIDUAL", math.inf)  # every fit's residual taken, not screened
    passes = []
    monkeypatch.setattr(cf, "misfit64", lambda *a: passes.append(a) or float(nf.misfit64(*a)))
    fits = {name: cf.class_fit(gradients, label, cf.Observed.of(update, None))
            for name, update in (("own", one), ("batch", two))}
    assert not passes  # both scales lie near the trial the biases give: no second pass
    monkeypatch.setattr(cf, "NEAR", 0.0)  # every residual from a second pass, entry by entry
    for name, update in (("own", one), ("batch", two)):
        again = cf.class_fit(gradients, label, cf.Observed.of(update, None))
        assert again.scale == fits[name].scale
        assert fits[name].residual >= again.residual * (1 - 1e-12)  # a bound, never below
        assert fits[name].residual == pytest.approx(again.residual, rel=1e-6, abs=1e-12)
    assert passes
    assert fits["own"].residual < 1e-5 < fits["batch"].residual
