"""DP-SGD through Opacus: per-sample clipping and Gaussian noise, checked against plain autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from user_models import DropoutMLP, FlowerNet

import fedleak
from fedleak.defenses import defended_gradient, parse_defense
from fedleak.defenses.dp_sgd import DPSGD
from fedleak.errors import OptionError
from fedleak.updates import batch_loss, compute_gradient_update, trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def per_sample_clipped_mean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """The mean of each sample's gradient (all trainable parameters together) clipped to L2 norm ``clip``,
    by plain autograd one sample at a time."""
    params = trainable_parameters(model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(batch_loss(model, x[i:i + 1], y[i:i + 1]), list(params.values()))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        for n, g in zip(params, grads):
            total[n] += factor * g
    return {n: t / x.shape[0] for n, t in total.items()}


def per_sample_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(trainable_parameters(model).values())
    return torch.stack([torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(
        batch_loss(model, x[i:i + 1], y[i:i + 1]), params))) for i in range(x.shape[0])])


def assert_maps_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def mlp_batch(digits):
    x, y = digits.batch(6, seed=11)
    return fedleak.make_mlp(digits.input_shape, [32], 10, seed=0), x, y


def test_no_noise_and_no_clipping_is_plain_autograd(mlp_batch):
    model, x, y = mlp_batch
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).gradient(model, x, y, gen(0))
    assert_maps_close(dp, dict(compute_gradient_update(model, x, y).gradients), atol=1e-6, rtol=0)


def test_soft_labels(mlp_batch):
    model, x, _ = mlp_batch
    soft = torch.softmax(torch.randn(x.shape[0], 10, generator=gen(1)), dim=1)
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).gradient(model, x, soft, gen(0))
    assert_maps_close(dp, dict(compute_gradient_update(model, x, soft).gradients), atol=1e-6, rtol=0)
    clip = float(per_sample_norms(model, x, soft).median())
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip).gradient(model, x, soft, gen(0))
    assert_maps_close(dp, per_sample_clipped_mean(model, x, soft, clip), atol=1e-6, rtol=1e-5)


def test_clipping_is_per_sample_on_the_whole_gradient(mlp_batch):
    model, x, y = mlp_batch
    norms = per_sample_norms(model, x, y)
    clip = float(norms.median())  # some samples clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip).gradient(model, x, y, gen(0))
    expected = per_sample_clipped_mean(model, x, y, clip)
    assert_maps_close(dp, expected, atol=1e-6, rtol=1e-5)
    # not the per-layer clipping nor the clipping of the mean
    plain = compute_gradient_update(model, x, y).gradients
    assert any(not torch.allclose(expected[k], plain[k], atol=1e-4) for k in plain)


def test_noise_has_std_z_c_over_m_and_follows_the_generator(digits):
    x, y = digits.batch(8, seed=12)
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    z, clip = 1.5, 0.5
    clean = per_sample_clipped_mean(model, x, y, clip)
    noisy = DPSGD(noise_multiplier=z, max_grad_norm=clip).gradient(model, x, y, gen(7))
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in clean]).double()
    n, sigma = diff.numel(), z * clip / x.shape[0]
    assert n > 4000
    assert abs(float(diff.std()) / sigma - 1) < 6 / (2 * n) ** 0.5  # the std's standard error is sigma/sqrt(2n)
    assert abs(float(diff.mean())) < 6 * sigma / n ** 0.5
    again = DPSGD(noise_multiplier=z, max_grad_norm=clip).gradient(model, x, y, gen(7))
    other = DPSGD(noise_multiplier=z, max_grad_norm=clip).gradient(model, x, y, gen(8))
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert all(not torch.allclose(noisy[k], other[k]) for k in noisy)


def test_the_model_is_left_as_it_was(mlp_batch):
    model, x, y = mlp_batch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = compute_gradient_update(model, x, y).gradients
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    user_grads = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = user_grads[n]
    model.eval()
    defense = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    first = defense.gradient(model, x, y, gen(3))
    second = defense.gradient(model, x, y, gen(3))  # works twice in a row, the same
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for n, p in model.named_parameters():
        assert p.grad is user_grads[n] and bool((p.grad == 0.25).all())
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and not vars(p)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attrs  # no hook lists, no activations
    assert not any(m.training for m in model.modules())
    for p in model.parameters():
        p.grad = None
    after = compute_gradient_update(model, x, y).gradients  # no Opacus hook fires any more
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_dropout_model_and_frozen_layer(digits):
    x, y = digits.batch(5, seed=13)
    model = DropoutMLP(64, 32, 10, p=0.5).eval()
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).gradient(model, x, y, gen(0))
    assert_maps_close(dp, dict(compute_gradient_update(model, x, y).gradients), atol=1e-6, rtol=0)
    assert not model.training and not model.dropout.training
    model.fc1.weight.requires_grad_(False)
    clip = float(per_sample_norms(model, x, y).median())
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip).gradient(model, x, y, gen(0))
    assert set(dp) == {"fc1.bias", "fc2.weight", "fc2.bias"}
    assert_maps_close(dp, per_sample_clipped_mean(model, x, y, clip), atol=1e-6, rtol=1e-5)
    assert model.fc1.weight.grad is None


def test_flower_quickstart_cnn():
    torch.manual_seed(0)
    net = FlowerNet()
    x = torch.rand(4, 3, 32, 32, generator=gen(2))
    y = torch.tensor([3, 1, 4, 1])
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e6).gradient(net, x, y, gen(0))
    assert_maps_close(dp, dict(compute_gradient_update(net, x, y).gradients), atol=1e-6, rtol=0)
    clip = float(per_sample_norms(net, x, y).median())
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip).gradient(net, x, y, gen(0))
    assert_maps_close(dp, per_sample_clipped_mean(net, x, y, clip), atol=1e-6, rtol=1e-4)
    assert not any(vars(p) for p in net.parameters())


def test_batchnorm_model_is_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    x, y = torch.randn(3, 1, 8, 8, generator=gen(0)), torch.tensor([0, 1, 2])
    with pytest.raises(OptionError, match=r"(?s)BatchNorm2d.*GroupNorm.*ModuleValidator\.fix"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0).gradient(model, x, y, gen(0))
    assert not any(vars(p) for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_no_warnings_reach_the_user(mlp_batch):
    model, x, y = mlp_batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0).gradient(model, x, y, gen(0))


def test_parameters_are_checked():
    for bad, match in (({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, "noise_multiplier"),
                       ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
                       ({"noise_multiplier": float("nan"), "max_grad_norm": 1.0}, "noise_multiplier"),
                       ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "gdp"}, "accountant")):
        with pytest.raises(OptionError, match=match):
            DPSGD(**bad)
    with pytest.raises(OptionError, match="max_grad_norm"):
        parse_defense("dp-sgd:noise_multiplier=1.0")
    defense = parse_defense("dp-sgd:noise_multiplier=0.5,max_grad_norm=2,accountant=prv")
    assert defense == DPSGD(0.5, 2.0, "prv")
    assert all(DPSGD(**s) for s in DPSGD.strengths)
    assert [s["noise_multiplier"] for s in DPSGD.strengths] == sorted(s["noise_multiplier"] for s in DPSGD.strengths)


def test_defended_gradient_end_to_end(mlp_batch):
    model, x, y = mlp_batch
    spec = "dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0"
    out = defended_gradient(model, x, y, spec, seed=3)
    again = defended_gradient(model, x, y, spec, seed=3)
    other = defended_gradient(model, x, y, spec, seed=4)
    g = out.update.gradients
    assert out.update.num_examples == x.shape[0] and set(g) == set(dict(model.named_parameters()))
    assert all(torch.equal(g[k], again.update.gradients[k]) for k in g)
    assert all(not torch.equal(g[k], other.update.gradients[k]) for k in g)
    clean = per_sample_clipped_mean(model, x, y, 1.0)
    diff = torch.cat([(g[k] - clean[k]).flatten() for k in g])
    assert 0.8 < float(diff.std()) / (1.0 / x.shape[0]) < 1.2


def test_unused_parameters_are_named():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(64, 10), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x.flatten(1))

    model = Unused()
    x, y = torch.randn(3, 1, 8, 8, generator=gen(0)), torch.tensor([0, 1, 2])
    with pytest.raises(fedleak.ModelError, match=r"spare\.weight.*requires_grad_\(False\)"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0).gradient(model, x, y, gen(0))
    assert not any(vars(p) for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    model.spare.requires_grad_(False)
    assert set(DPSGD(noise_multiplier=1.0, max_grad_norm=1.0).gradient(model, x, y, gen(0))) == {"used.weight", "used.bias"}
