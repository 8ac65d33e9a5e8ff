"""What kind of update: declared steps, and the noise / sparsification / quantisation signatures."""

import pytest
import torch
from user_models import mixed_precision_gradient

import fedleak
from fedleak.errors import UpdateError
from fedleak.update_kind import describe_update


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = fedleak.make_mlp((1, 8, 8), [128], 10)
    data = fedleak.load_dataset("digits")
    return model, data.x[:32], data.y[:32]


def test_gradient_is_clean(setting):
    model, x, y = setting
    kind = describe_update(fedleak.compute_gradient_update(model, x[:8], y[:8]), model)
    assert kind.kind == "gradient" and kind.is_gradient and kind.exact_route_possible
    assert kind.noised is False and kind.sparsified is None and kind.quantised is None
    assert kind.summary().startswith("FedSGD gradient") and kind.summed is False


def test_noise_sparsification_and_quantisation_are_detected(setting):
    model, x, y = setting
    grads = fedleak.compute_gradient_update(model, x[:8], y[:8]).gradients
    gen = torch.Generator().manual_seed(1)
    noised = describe_update({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in grads.items()}, model)
    assert noised.noised and not noised.noise_declared and not noised.exact_route_possible
    assert "noised or not plain SGD" in noised.summary()
    sparse = describe_update({k: v * (torch.rand(v.shape, generator=gen) > 0.9) for k, v in grads.items()}, model)
    assert sparse.sparsified is not None and sparse.sparsified > 0.8 and not sparse.noised
    quant = describe_update({k: torch.round(v * 100) / 100 for k, v in grads.items()}, model)
    assert quant.quantised is not None and quant.quantised <= 256 and "quantised" in quant.summary()


def test_a_summed_loss_is_detected(setting):
    model, x, y = setting
    loss = torch.nn.functional.cross_entropy(model(x[:8]), y[:8], reduction="sum")
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    kind = describe_update(fedleak.GradientUpdate(grads, num_examples=8), model)
    assert kind.summed and not kind.noised and kind.exact_route_possible
    assert "loss summed over the batch" in kind.summary()
    assert any("loss_reduction='sum'" in e for e in kind.evidence)
    # the mean over any batch never adds up to more than 2: the same batch's mean loss is not flagged
    mean = describe_update(fedleak.compute_gradient_update(model, x, y), model)
    assert mean.summed is False and describe_update(grads).summed is None  # without the model: not looked for


def test_local_steps_declared_implied_or_unknown(setting):
    model, x, y = setting
    one = fedleak.fedavg_update(model, x[:8], y[:8], lr=0.1)
    assert describe_update(one, model).kind == "weights"  # not declared: the exact route may still try
    assert describe_update(one, model, declared={"local_steps": 1}).kind == "one-step"
    many = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=4, batch_size=8, reveal_local_steps=True)
    kind = describe_update(many, model)
    assert kind.multi_step and kind.local_steps == 4 and not kind.exact_route_possible
    epoch = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=4, batch_size=8)
    implied = describe_update(epoch, model, declared={"local_epochs": 1, "batch_size": 8})
    assert implied.multi_step and implied.local_steps == 4 and "4 local steps of 8" in implied.summary()
    # momentum SGD over several steps keeps the zero-sum signature: not mistaken for noise
    assert implied.noised is False


def test_a_batch_norm_model_s_state_dict_update(digits):
    """A FedAvg client of a model with BatchNorm sends its state dict: the running statistics and the integer
    counter ``num_batches_tracked``, which moves by one per local step, so it tells the steps."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x, y = digits.batch(4, seed=1)
    for steps, kind in ((1, "one-step"), (3, "multi-step")):
        update = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=steps)
        assert update.before["1.num_batches_tracked"].dtype == torch.int64
        assert "1.num_batches_tracked" not in update.delta() and "1.running_mean" in update.delta()
        described = describe_update(update, model)
        assert described.kind == kind
        assert f"'1.num_batches_tracked' moved by {steps}: {steps} local step(s)" in described.evidence[0]
        assert set(update.parameters_of(model)) == {n for n, _ in model.named_parameters()}
    rec = fedleak.reconstruct(model, fedleak.fedavg_update(model, x, y, lr=0.1), input_shape=(1, 8, 8))
    assert rec.num_certified == 0 and "BatchNorm '1' in training mode" in rec.why_uncertified()
    stranger = fedleak.WeightUpdate({**update.before, "extra.weight": torch.zeros(2)},
                                    {**update.after, "extra.weight": torch.ones(2)})
    with pytest.raises(UpdateError, match=r"unexpected \['extra.weight'\]"):
        stranger.parameters_of(model)


def test_a_weight_change_finer_than_the_client_s_rounding_is_said_to_be(setting):
    """One small step: most rows of the change are below the float32 rounding of the client's new weights, which
    no witness row of a certificate may exceed (the exact attack's max_noise, 1e-4); the attack certifies nothing."""
    model, x, y = setting
    coarse = describe_update(fedleak.fedavg_update(model, x[:8], y[:8], lr=0.1), model)
    assert coarse.rounding < 1e-4 and not coarse.too_fine
    fine_update = fedleak.fedavg_update(model, x[:8], y[:8], lr=1e-4)
    fine = describe_update(fine_update, model)
    assert fine.rounding > 1e-4 and fine.too_fine and "finer than the rounding" in fine.summary()
    assert any("the exact route certifies few samples of it or none" in e for e in fine.evidence)
    assert fedleak.reconstruct(model, fine_update).num_certified == 0
    plan = fedleak.plan(model, fine_update, (x, y), batch_sizes=[8])
    assert "finer than the rounding of the client's weights" in plan.verdict


@pytest.mark.parametrize("how", ["bfloat16", "autocast"])
def test_a_rounded_gradient_is_said_to_be_and_not_read_as_noised(setting, how):
    """A gradient in bfloat16 (sent so, or computed under autocast): its precision is named, the exact route cannot
    certify, and the bias's rounding (its entries sum to about 1e-3 of its norm) is not taken for noise."""
    model, x, y = setting
    if how == "autocast":
        update = fedleak.read_update(model, mixed_precision_gradient(model, x, y, torch.bfloat16), num_examples=32)
    else:
        plain = fedleak.compute_gradient_update(model, x, y)
        update = fedleak.GradientUpdate({k: v.bfloat16() for k, v in plain.gradients.items()}, num_examples=32)
    kind = describe_update(update, model)
    assert kind.precision == "bfloat16" and not kind.noised and kind.only_rounded
    assert not kind.exact_route_possible and "values rounded to bfloat16" in kind.summary()
    assert kind.to_dict()["precision"] == "bfloat16"
    assert describe_update(fedleak.compute_gradient_update(model, x, y), model).precision is None
    verdict = fedleak.plan(model, update, (x, y)).verdict
    assert verdict.startswith("the exact route cannot certify") and "to within that rounding" in verdict


def test_clipping_by_value_is_detected_and_not_read_as_noise(setting):
    model, x, y = setting
    grads = fedleak.compute_gradient_update(model, x[:8], y[:8]).gradients
    kind = describe_update({k: v.clamp(-1e-3, 1e-3) for k, v in grads.items()}, model)
    assert kind.value_clip == pytest.approx(1e-3) and not kind.exact_route_possible and not kind.noised
    assert "clipped by value at ±0.001" in kind.summary() and "clip_grad_value_" in kind.evidence[0]
    assert describe_update(grads, model).value_clip is None


def test_a_negated_gradient_is_said_to_read_so(setting):
    model, x, y = setting
    grads = fedleak.compute_gradient_update(model, x[:4], y[:4]).gradients
    assert not any("negative of a cross-entropy gradient" in e for e in describe_update(grads, model).evidence)
    kind = describe_update({k: -v for k, v in grads.items()}, model)
    assert any("negative of a cross-entropy gradient" in e and "WeightUpdate" in e for e in kind.evidence)


def test_a_gradient_scaled_beyond_a_summed_loss_is_not_read_as_one(setting):
    """A gradient sent with its mixed-precision loss scale (GradScaler's 65,536, no unscale_): with the count
    reported, more than a summed loss over it can give; not flagged as a summed loss, and the exclusivity attack
    reads it as a gradient times a common factor: it certifies the batch on a model wide enough (64-512-10) that more
    than half of it is certified at that factor, which no blends of near-copies can be; on the 64-128-10 model, 4 of 8
    are, and those it returns exact but uncertified."""
    model, x, y = setting
    grads = fedleak.compute_gradient_update(model, x[:8], y[:8]).gradients
    scaled = fedleak.GradientUpdate({k: v * 65536.0 for k, v in grads.items()}, num_examples=8)
    kind = describe_update(scaled, model)
    assert kind.scaled_up and not kind.summed and "scaled up beyond a summed loss" in kind.summary()
    assert any("GradScaler" in e for e in kind.evidence)
    narrow = fedleak.reconstruct(model, scaled)
    assert narrow.num_certified == 0 and fedleak.metrics.match(narrow, x[:8], y[:8]).exact.sum() >= 4
    wide = fedleak.make_mlp((1, 8, 8), [512], 10, seed=0)
    own = fedleak.compute_gradient_update(wide, x[:8], y[:8]).gradients
    rec = fedleak.reconstruct(wide, fedleak.GradientUpdate({k: v * 65536.0 for k, v in own.items()}, num_examples=8))
    assert rec.num_certified == 8 and fedleak.metrics.match(rec, x[:8], y[:8]).false_certificates == 0
    summed = describe_update(fedleak.GradientUpdate({k: v * 8 for k, v in grads.items()}, num_examples=8), model)
    assert summed.summed is True and not summed.scaled_up


def test_the_learning_rate_the_server_knows(digits):
    """A weight change's learning rate, carried by the update or declared, is part of what the update is; a gradient
    has none."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    plain = fedleak.fedavg_update(model, x, y, lr=0.1)
    assert describe_update(plain, model).learning_rate is None
    told = describe_update(fedleak.fedavg_update(model, x, y, lr=0.1, reveal_learning_rate=True), model)
    assert told.learning_rate == 0.1 and "at learning rate 0.1" in told.summary()
    declared = describe_update(plain, model, declared={"learning_rate": "0.05", "local_steps": 1})
    assert declared.learning_rate == 0.05 and declared.to_dict()["learning_rate"] == 0.05
    assert "1 local step at learning rate 0.05" in declared.summary()
    assert describe_update(fedleak.compute_gradient_update(model, x, y), model,
                           declared={"learning_rate": 0.1}).learning_rate is None


def test_a_class_fished_gradient_of_few_bit_inputs_is_not_read_as_quantised_or_half_precision(digits):
    """A class-fished model's first layer sums ``-2/M`` times sixteenths (sklearn's digits' pixels): 26 distinct
    values that all fit bfloat16, by the data's nature. Its output layer's values are float32's, so the update was
    neither quantised nor rounded (read before as both, and as one the exact route cannot certify)."""
    model = fedleak.class_fishing_weights(fedleak.make_mlp(digits.input_shape, [256], 10, seed=0), 3)
    x, y = digits.x[:16], digits.y[:16]
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    first = grads["1.weight"]
    assert torch.unique(first).numel() <= 256 and torch.equal(first.bfloat16().float(), first)  # the trap
    kind = describe_update(fedleak.GradientUpdate(grads, num_examples=16), model)
    assert kind.quantised is None and kind.precision is None and kind.noised is False
    assert kind.summary() == "FedSGD gradient: 16 examples"
    said = fedleak.plan(model, fedleak.GradientUpdate(grads, num_examples=16)).verdict
    assert said.startswith("the model's output layer is class-fished (class 3): run class-fishing")
    # quantising every tensor, or computing under autocast, is still read as such
    rounded = {k: torch.round(v / v.abs().max() * 100) * (v.abs().max() / 100) for k, v in grads.items()}
    levels = describe_update(rounded, model)
    assert levels.quantised is not None and "and so does '3.weight'" in " ".join(levels.evidence)
    mixed = mixed_precision_gradient(model, x, y, torch.bfloat16)
    assert describe_update(dict(zip(grads, mixed)), model).precision == "bfloat16"
