"""QSGD, deterministic uniform quantisation, half precision and sign compression."""

from __future__ import annotations

import math

import pytest
import torch

from fedleak.defenses import make_defense, parse_defense
from fedleak.errors import OptionError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


V = torch.tensor([0.3, -0.5, 0.1, 0.8, 0.0])


@pytest.mark.parametrize("levels", [1, 4])
def test_qsgd_is_unbiased_and_on_its_grid(levels):
    d = make_defense("qsgd", levels=levels)
    draws = 4000
    out = d.apply({f"t{i}": V for i in range(draws)}, None, gen(0))
    sent = torch.stack(list(out.values()))  # draws x 5, each row one QSGD draw of V
    norm = float(torch.linalg.vector_norm(V))
    codes = sent / norm * levels
    torch.testing.assert_close(codes, codes.round(), atol=1e-5, rtol=0)  # norm * sign * l / s
    assert float(codes.abs().max()) <= levels + 1e-5
    assert bool((torch.sign(sent) * torch.sign(V) >= 0).all())  # the sign of v, or 0
    assert not sent[:, 4].any()  # a zero entry stays zero
    # the variance of one entry is at most norm^2 / (4 s^2): the mean of 4000 draws is within 5 standard errors
    tol = 5 * norm / (2 * levels) / math.sqrt(draws)
    assert (sent.mean(0) - V).abs().max() < tol
    r = V.abs() / norm * levels  # the two levels around |v_i| / ||v||, for a non-integer code
    assert set(codes[:, 0].abs().round().tolist()) <= {math.floor(r[0]), math.ceil(r[0])}


def test_qsgd_replays_from_the_generator_and_is_not_a_known_function():
    d = make_defense("qsgd", levels=2)
    update = {"w": V}
    assert torch.equal(d.apply(update, None, gen(5))["w"], d.apply(update, None, gen(5))["w"])
    many = [d.apply(update, None, gen(s))["w"] for s in range(10)]
    assert any(not torch.equal(many[0], m) for m in many[1:])
    assert d.known_function is False
    assert torch.equal(d.observe({"w": V}, {"w": torch.zeros(5)})["w"], V)  # identity: unbiased
    assert torch.equal(d.apply({"z": torch.zeros(3)}, None, gen())["z"], torch.zeros(3))


def test_qsgd_bytes():
    sent = {"w": torch.zeros(10), "b": torch.zeros(3)}
    # levels 4: a sign bit and ceil(log2 5) = 3 bits per entry; plus a float32 norm per tensor
    assert make_defense("qsgd", levels=4).encoded_bytes(sent) == (5 + 4) + (2 + 4)
    assert make_defense("qsgd", levels=1).encoded_bytes(sent) == (3 + 4) + (1 + 4)  # 2 bits per entry


def test_quantize_rounds_to_symmetric_uniform_levels():
    v = torch.tensor([1.0, -0.5, 0.26, 0.0])
    out = make_defense("quantize", bits=4).apply({"w": v}, None, gen())["w"]  # scale 1/7: codes 7, -3.5, 1.82, 0
    torch.testing.assert_close(out, torch.tensor([1.0, -4 / 7, 2 / 7, 0.0]))  # round half to even
    x = torch.randn(1000, generator=gen(1))
    for bits in (2, 4, 8):
        q = make_defense("quantize", bits=bits).apply({"w": x}, None, gen())["w"]
        qmax = 2 ** (bits - 1) - 1
        scale = float(x.abs().max()) / qmax
        assert len(torch.unique(q)) <= 2 * qmax + 1
        assert float((q - x).abs().max()) <= scale / 2 * (1 + 1e-5)
    assert torch.equal(make_defense("quantize", bits=8).apply({"z": torch.zeros(4)}, None, gen())["z"], torch.zeros(4))


def test_quantize_observe_is_straight_through_at_the_observed_scale():
    d = make_defense("quantize", bits=4)
    true = torch.tensor([1.0, -0.5, 0.26, 0.0])
    observed = d.apply({"w": true}, None, gen())
    sim = torch.tensor([0.9, -0.3, 0.5, 2.0], requires_grad=True)
    out = d.observe({"w": sim}, observed)["w"]
    torch.testing.assert_close(out.detach(), torch.tensor([6 / 7, -2 / 7, 4 / 7, 1.0]))  # clamped at qmax * scale
    (out * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    torch.testing.assert_close(sim.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # identity backward
    torch.testing.assert_close(d.observe({"w": true}, observed)["w"], observed["w"])
    assert d.encoded_bytes({"w": torch.zeros(10)}) == 5 + 4
    assert make_defense("quantize", bits=8).encoded_bytes({"w": torch.zeros(10)}) == 10 + 4


def test_sign_compression_and_its_observe():
    v = torch.tensor([0.5, -1.5, 0.0, 2.0])  # mean |v| = 1
    torch.testing.assert_close(make_defense("sign").apply({"w": v}, None, gen())["w"], torch.tensor([1.0, -1, 0, 1]))
    w = 3 * v
    torch.testing.assert_close(make_defense("sign").apply({"w": w}, None, gen())["w"], torch.tensor([3.0, -3, 0, 3]))
    torch.testing.assert_close(make_defense("sign", scale="none").apply({"w": w}, None, gen())["w"],
                               torch.tensor([1.0, -1, 0, 1]))
    d = make_defense("sign")
    sim = torch.tensor([0.2, -0.4, 0.6, -0.8], requires_grad=True)
    out = d.observe({"w": sim}, {"w": torch.zeros(4)})["w"]
    torch.testing.assert_close(out.detach(), torch.tensor([0.5, -0.5, 0.5, -0.5]))
    out.sum().backward()
    assert sim.grad is not None and sim.grad.abs().sum() > 0
    assert d.encoded_bytes({"w": torch.zeros(10), "b": torch.zeros(3)}) == (2 + 4) + (1 + 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_every_entry_and_sends_half_the_bytes(dtype):
    d = parse_defense(f"half-precision:dtype={str(dtype)[6:]}")
    x = torch.randn(1000, generator=gen(2))
    out = d.apply({"w": x, "steps": torch.tensor(3)}, None, gen())
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], x.to(dtype).float())
    assert torch.equal(out["steps"], torch.tensor(3))  # integers pass unchanged
    assert float(((out["w"] - x) / x).abs().max()) <= torch.finfo(dtype).eps / 2
    sim = x.clone().requires_grad_(True)
    seen = d.observe({"w": sim}, out)["w"]
    torch.testing.assert_close(seen.detach(), out["w"])
    seen.sum().backward()
    torch.testing.assert_close(sim.grad, torch.ones(1000))  # straight through
    assert d.encoded_bytes({"w": torch.zeros(10), "b": torch.zeros(3)}) == 26


def test_a_half_precision_upload_still_gives_the_samples_away(fashion):
    """The exact attack certifies nothing of a float16 upload, and says why; auto rebuilds every sample of the
    batch from the first Linear layer's rows to the rounding: half the bytes, no protection."""
    import fedleak
    from fedleak import metrics

    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(4, seed=3)
    update = fedleak.defended_gradient(model, x, y, "half-precision").update
    exact = fedleak.reconstruct(model, update, defense="half-precision")
    assert exact.num_certified == 0 and "went through half-precision: every entry is rounded" in exact.why_uncertified()
    rec = fedleak.reconstruct(model, update, attack="auto", budget=3, progress=False)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and (scores.matched >= 0).all() and float(scores.psnr.min()) >= 60


@pytest.mark.parametrize("name, params, bad", [
    ("qsgd", dict(levels=0), "levels"), ("qsgd", dict(levels=2.5), "levels"),
    ("quantize", dict(bits=1), "bits"), ("quantize", dict(bits=17), "bits"),
    ("sign", dict(scale="max"), "scale"), ("half-precision", dict(dtype="float8"), "dtype"),
])
def test_bad_parameters(name, params, bad):
    with pytest.raises(OptionError, match=bad):
        make_defense(name, **params)


def test_bad_parameters_from_a_spec():
    with pytest.raises(OptionError, match="levels"):
        parse_defense("qsgd:levels=0")
    with pytest.raises(OptionError, match="bits"):
        parse_defense("quantize:bits=1")
    assert parse_defense("qsgd:levels=8").levels == 8
