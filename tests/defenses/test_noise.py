"""Gaussian and Laplace noise on what a client sends, and their privacy accounting."""

from __future__ import annotations

import math

import pytest
import torch

import fedleak
from fedleak.clients import fedavg_update
from fedleak.defenses import Accounting, defend_update, make_defense, parse_defense
from fedleak.errors import OptionError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def zeros(n: int = 200_000) -> dict[str, torch.Tensor]:
    return {"fc1.weight": torch.zeros(n // 2), "fc1.bias": torch.zeros(n // 2)}


def test_gaussian_noise_has_std_sigma_and_replays_from_the_generator():
    d = make_defense("gaussian-noise", sigma=0.1)
    update = zeros()
    out = d.apply(update, None, gen(3))
    noise = torch.cat([t.flatten() for t in out.values()])
    assert abs(float(noise.std()) - 0.1) < 0.002 and abs(float(noise.mean())) < 0.002
    assert all(not t.any() for t in update.values())  # the input is untouched
    again = d.apply(update, None, gen(3))
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = d.apply(update, None, gen(4))
    assert not torch.equal(out["fc1.weight"], other["fc1.weight"])
    assert not torch.equal(out["fc1.weight"], out["fc1.bias"])  # every tensor gets its own draw
    assert d.known_function is False
    assert d.observe({"a": torch.ones(2)}, {"a": torch.zeros(2)})["a"].tolist() == [1.0, 1.0]
    assert d.privacy(Accounting(rounds=10)) is None  # no clipping: unbounded sensitivity


def test_gaussian_noise_clips_the_whole_update_first():
    update = {"a.weight": torch.tensor([[3.0, 0.0]]), "a.bias": torch.tensor([4.0]), "b.weight": torch.tensor([0.0])}
    out = make_defense("gaussian-noise", sigma=0.0, clip=1.0).apply(update, None, gen())
    torch.testing.assert_close(out["a.weight"], torch.tensor([[0.6, 0.0]]))
    torch.testing.assert_close(out["a.bias"], torch.tensor([0.8]))
    small = make_defense("gaussian-noise", sigma=0.0, clip=10.0).apply(update, None, gen())
    assert all(torch.equal(small[k], update[k]) for k in update)  # under the bound: unchanged
    assert update["a.bias"].item() == 4.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_gaussian_noise_privacy_is_dp_fedavg_from_opacus(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    d = make_defense("gaussian-noise", sigma=0.8, clip=0.5, accountant=accountant)
    acc = Accounting(rounds=50, client_rate=0.1, delta=1e-5)
    p = d.privacy(acc)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(50):
        reference.step(noise_multiplier=0.8 / 0.5, sample_rate=0.1)
    expected = reference.get_epsilon(delta=1e-5)
    assert p.epsilon == pytest.approx(expected, rel=1e-3)
    assert 0 < p.epsilon < 10
    assert p.delta == 1e-5 and p.unit == "client" and accountant in p.accountant
    more = make_defense("gaussian-noise", sigma=1.6, clip=0.5, accountant=accountant).privacy(acc)
    assert more.epsilon < p.epsilon  # more noise, less epsilon
    assert make_defense("gaussian-noise", sigma=0.0, clip=1.0).privacy(acc).epsilon == math.inf


def test_laplace_noise_scale_l1_clipping_and_pure_epsilon():
    d = make_defense("laplace-noise", scale=0.05)
    out = d.apply(zeros(), None, gen(1))
    noise = torch.cat([t.flatten() for t in out.values()])
    assert abs(float(noise.abs().mean()) - 0.05) < 0.001  # E|Laplace(0, b)| = b
    assert abs(float(noise.std()) - 0.05 * math.sqrt(2)) < 0.002
    assert torch.equal(d.apply(zeros(), None, gen(1))["fc1.weight"], out["fc1.weight"])
    update = {"w": torch.tensor([3.0, -1.0]), "b": torch.tensor([-4.0])}  # L1 norm 8
    clipped = make_defense("laplace-noise", scale=0.0, clip=2.0).apply(update, None, gen())
    torch.testing.assert_close(clipped["w"], torch.tensor([0.75, -0.25]))
    torch.testing.assert_close(clipped["b"], torch.tensor([-1.0]))
    p = make_defense("laplace-noise", scale=0.5, clip=2.0).privacy(Accounting(rounds=3))
    assert p.epsilon == pytest.approx(12.0) and p.delta == 0.0 and p.unit == "client"
    assert d.privacy(Accounting()) is None


@pytest.mark.parametrize("name, params, bad", [
    ("gaussian-noise", dict(sigma=-1.0), "sigma"),
    ("gaussian-noise", dict(sigma=float("nan")), "sigma"),
    ("gaussian-noise", dict(sigma=0.1, clip=0.0), "clip"),
    ("gaussian-noise", dict(sigma=0.1, accountant="gdp"), "accountant"),
    ("laplace-noise", dict(scale=-0.1), "scale"),
    ("laplace-noise", dict(scale=0.1, clip=-1.0), "clip"),
])
def test_bad_parameters(name, params, bad):
    with pytest.raises(OptionError, match=bad):
        make_defense(name, **params)


def test_bad_parameters_from_a_spec():
    with pytest.raises(OptionError, match="clip"):
        parse_defense("gaussian-noise:sigma=0.1,clip=0")
    with pytest.raises(OptionError, match="defense 'gaussian-noise' needs sigma"):
        parse_defense("gaussian-noise:clip=1")  # sigma is required
    with pytest.raises(OptionError, match=r"defense 'dp-sgd' needs max_grad_norm \(required: noise_multiplier, "
                                          r"max_grad_norm; e.g. noise_multiplier=0.5, max_grad_norm=1.0\)"):
        parse_defense("dp-sgd:noise_multiplier=1.0")
    d = parse_defense("laplace-noise:scale=0.01,clip=none")
    assert d.clip is None and d.scale == 0.01


def test_defend_update_noises_a_weight_update_on_its_change(digits):
    x, y = digits.batch(2, seed=41)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    upd = fedavg_update(model, x, y, lr=0.5)
    noisy = defend_update(upd, make_defense("gaussian-noise", sigma=0.01), seed=0)
    assert isinstance(noisy, fedleak.WeightUpdate)
    assert all(torch.equal(noisy.before[k], upd.before[k]) for k in upd.before)  # the server's weights intact
    diff = torch.cat([(noisy.after[k] - upd.after[k]).flatten() for k in upd.after])
    assert abs(float(diff.std()) - 0.01) < 0.001 and abs(float(diff.mean())) < 0.001
    again = defend_update(upd, "gaussian-noise:sigma=0.01", seed=0)
    assert all(torch.equal(again.after[k], noisy.after[k]) for k in upd.after)
    assert "gaussian-noise" in noisy.metadata["defense"]
