"""Flower's own DP as defenses: ``local-dp`` (LocalDpMod) and ``central-dp`` (fixedclipping_mod + the server's
DifferentialPrivacyClientSideFixedClipping). Outside Flower their ``apply`` must do exactly what the Flower mods
do to a reply; checked here against the real mods on real Flower messages."""

import math
import time

import numpy as np
import pytest
import torch

import fedleak
from fedleak.defenses import Accounting, DefenseStack, defended_gradient, make_defense, parse_defense
from fedleak.defenses.accounting import gaussian_epsilon
from fedleak.defenses.flower_dp import flower_seed
from fedleak.errors import OptionError

flwr = pytest.importorskip("flwr")


def _norm(update):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def _through_mod(mod, before, after, config=None):
    """``mod`` run on a real train message carrying ``before`` whose app replies ``after``; the weights it sends."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                    created_at=time.time(), ttl=3600.0, message_type="train")
    msg = Message(RecordDict({"arrays": ArrayRecord(before), "config": ConfigRecord(config or {})}), metadata=meta)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def app(m, c):
        return Message(RecordDict({"arrays": ArrayRecord(after), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=m)

    return mod(msg, context, app).content["arrays"].to_torch_state_dict()


@pytest.fixture()
def weights():
    g = torch.Generator().manual_seed(0)
    before = {"fc.weight": torch.randn(20, 30, generator=g), "fc.bias": torch.randn(20, generator=g)}
    after = {k: v - 0.05 * torch.randn(v.shape, generator=g) for k, v in before.items()}
    return before, after


def test_local_dp_apply_is_what_localdpmod_sends(weights):
    before, after = weights
    defense = make_defense("local-dp", clip=0.2, epsilon=0.5, delta=1e-4)
    change = {k: before[k] - after[k] for k in before}
    assert _norm(change) > 0.2  # the mod has something to clip
    sent = defense.apply(change, None, torch.Generator().manual_seed(7))
    np.random.seed(flower_seed(torch.Generator().manual_seed(7)))  # the draw apply seeds numpy with
    flower = _through_mod(defense.flower_mod(), before, after)
    for k in before:
        torch.testing.assert_close(sent[k], before[k] - flower[k], atol=2e-6, rtol=0)
    # std sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, sensitivity 2 * clip by default
    assert defense.noise_std == pytest.approx(0.4 * math.sqrt(2 * math.log(1.25e4)) / 0.5)


def test_local_dp_clips_then_adds_calibrated_noise():
    big = {"w": torch.full((400, 500), 0.01)}  # norm 4.47
    quiet = make_defense("local-dp", clip=1.0, epsilon=1e9)  # noise std ~1e-8: the clipping alone
    out = quiet.apply(big, None, torch.Generator().manual_seed(0))
    assert _norm(out) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out["w"], big["w"] / _norm(big), atol=1e-6)  # same direction, scaled down
    small = {"w": torch.full((10, 10), 0.001)}  # norm 0.01 < clip: left as it is
    assert torch.allclose(quiet.apply(small, None, torch.Generator())["w"], small["w"], atol=1e-6)
    noisy = make_defense("local-dp", clip=1.0, epsilon=0.5, delta=1e-5, sensitivity=0.01)
    noise = noisy.apply({"w": torch.zeros(400, 500)}, None, torch.Generator().manual_seed(1))["w"]
    assert float(noise.std()) == pytest.approx(noisy.noise_std, rel=0.02)
    assert abs(float(noise.mean())) < 4 * noisy.noise_std / math.sqrt(noise.numel())


def test_local_dp_is_seeded_by_the_generator_and_leaves_numpy_alone():
    update = {"w": torch.randn(50, 5)}
    defense = make_defense("local-dp", clip=0.5, epsilon=1.0)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = defense.apply(update, None, torch.Generator().manual_seed(3))
    b = defense.apply(update, None, torch.Generator().manual_seed(3))
    c = defense.apply(update, None, torch.Generator().manual_seed(4))
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    assert np.array_equal(np.random.get_state()[1], state)


def test_local_dp_privacy_is_per_round_by_basic_composition():
    defense = make_defense("local-dp", clip=1.0, epsilon=0.5, delta=1e-6)
    p = defense.privacy(Accounting(rounds=4))
    assert (p.epsilon, p.delta, p.unit) == (2.0, pytest.approx(4e-6), "client")
    assert p.accountant == "basic composition" and "basic composition" in p.mechanism
    assert "nominal" not in p.mechanism
    assert "proven for epsilon < 1 only" in make_defense("local-dp", epsilon=2.0).privacy(Accounting()).mechanism


def test_central_dp_apply_is_fixedclipping_mod(weights):
    before, after = weights
    defense = parse_defense("central-dp:noise_multiplier=1.0,clip=0.2")
    change = {k: before[k] - after[k] for k in before}
    sent = defense.apply(change, None, torch.Generator())
    assert _norm(sent) == pytest.approx(0.2, rel=1e-5)  # clipped, and no noise: the server adds it to the sum
    flower = _through_mod(__import__("flwr.clientapp.mod", fromlist=["x"]).fixedclipping_mod, before, after,
                          {"clipping_norm": 0.2})
    for k in before:
        torch.testing.assert_close(sent[k], before[k] - flower[k], atol=2e-6, rtol=0)
    # its forward model for a defense-aware attack: the same clipping, differentiable
    sim = {k: v.clone().requires_grad_(True) for k, v in change.items()}
    seen = defense.observe(sim, sent)
    assert _norm({k: v.detach() for k, v in seen.items()}) == pytest.approx(0.2, rel=1e-5)
    sum(v.sum() for v in seen.values()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in sim.values())


def test_central_dp_privacy_is_client_level_gaussian():
    acc = Accounting(rounds=5, client_rate=0.25, delta=1e-5)
    p = make_defense("central-dp", noise_multiplier=1.1, clip=1.0).privacy(acc)
    assert p.epsilon == pytest.approx(gaussian_epsilon(1.1, 0.25, 5, 1e-5)) and p.unit == "client"
    assert 0 < p.epsilon < make_defense("central-dp", noise_multiplier=0.7).privacy(acc).epsilon
    assert "without noise" in p.mechanism
    assert make_defense("central-dp", noise_multiplier=0.0).privacy(acc) is None


def test_flower_dp_in_a_defended_gradient():
    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, [32], 10, seed=0)
    x, y = data.batch(4, seed=0)
    sent = defended_gradient(model, x, y, DefenseStack.of("top-k:ratio=0.5 + central-dp:clip=0.05"), seed=0)
    assert _norm(sent.update.gradients) == pytest.approx(0.05, rel=1e-5)
    zeros = sum(int((g == 0).sum()) for g in sent.update.gradients.values())
    assert zeros >= sum(g.numel() for g in sent.update.gradients.values()) // 2  # top-k's zeros survive the scaling


@pytest.mark.parametrize("spec, message", [
    ("local-dp:epsilon=0", "epsilon"), ("local-dp:delta=1", "delta"), ("local-dp:clip=-1", "clip"),
    ("local-dp:sensitivity=0", "sensitivity"), ("central-dp:clip=0", "clip"),
    ("central-dp:accountant=moments", "accountant"), ("central-dp:noise_multiplier=-1", "noise_multiplier"),
    ("local-dp:sigma=1", "sigma"),
])
def test_bad_parameters_are_named(spec, message):
    with pytest.raises(OptionError, match=message):
        parse_defense(spec)


def test_central_dp_noise_is_the_servers_share_on_the_average():
    from fedleak.defenses import DefenseStack, make_defense

    central = make_defense("central-dp", noise_multiplier=2.0, clip=0.5)
    assert central.aggregate_noise(4) == 2.0 * 0.5 / 4  # what Flower's server wrapper adds to the mean
    assert make_defense("local-dp").aggregate_noise(4) == 0.0  # local DP noises on the client
    assert DefenseStack.of("top-k:ratio=0.1 + central-dp:noise_multiplier=2,clip=0.5").aggregate_noise(4) == 0.25
