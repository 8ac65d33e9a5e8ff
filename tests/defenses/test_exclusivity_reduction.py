"""Exclusivity reduction on real data: no sample of a defended batch is certified, at a measured cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from user_models import hidden_layer_scaled

import fedleak
from fedleak.defenses import (
    DefenseStack,
    ExclusivityReduction,
    ReductionOptions,
    defended_gradient,
    make_defense,
    parse_defense,
    reduce_exclusivity,
)
from fedleak.errors import OptionError
from fedleak.transforms import BatchTransform


def _attack(model, x, y):
    return fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))


@pytest.mark.parametrize("size", [8, 24])
def test_defended_batch_has_no_exan_and_no_certificate(fashion, size):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(size, seed=1)
    assert _attack(model, x, y).num_certified >= 4  # the undefended batch leaks
    res = reduce_exclusivity(model, x, y)
    assert res.protected
    report = fedleak.analyze_exclusivity(model, res.inputs, res.labels)
    assert int(report.layers[-1].exans.sum()) == 0  # float32 pattern, as the client computes
    rec = _attack(model, res.inputs, res.labels)
    assert rec.num_certified == 0
    kept = [s for s in res.samples if s.status != "dropped"]
    assert len(kept) >= size - 1
    assert all(0 <= s.linf < 0.2 for s in kept)
    assert float(res.inputs.min()) >= 0 and float(res.inputs.max()) <= 1
    d = res.to_dict()
    assert d["protected"] and len(d["samples"]) == size


def test_a_trained_models_confident_samples_do_not_hide_exclusive_rows(fashion, one_thread):
    """After training, some samples are classified almost surely: their loss gradient is about zero, so a neuron
    they share with one other sample is that sample's row all the same. Counted by activations only, the defense
    said 'protected' and the attack still certified 3 of these 16 samples exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(fashion.y), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(fashion.x[idx]), fashion.y[idx]).backward()
        opt.step()
    x, y = fashion.batch(16, seed=50)
    res = reduce_exclusivity(model, x, y)
    assert res.protected
    rec = _attack(model, res.inputs, res.labels)
    assert rec.num_certified == 0
    scores = fedleak.metrics.match(rec, res.inputs, res.labels)
    assert not np.any(scores.max_abs_error <= fedleak.metrics.EXACT_TOL)  # nothing rebuilt exactly, certified or not
    confident = [s for s in res.samples if s.status == "dropped"]
    assert all("confidently classified" in s.message for s in confident) and len(confident) <= 4


def test_max_exans_one_defeats_the_certificate_cheaper(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=2)
    strict = reduce_exclusivity(model, x, y, max_exans=0)
    loose = reduce_exclusivity(model, x, y, max_exans=1)
    assert loose.protected and strict.protected
    assert np.mean([s.l2 for s in loose.samples]) <= np.mean([s.l2 for s in strict.samples]) + 1e-9
    assert _attack(model, loose.inputs, loose.labels).num_certified == 0


def test_deep_net(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [256, 256], 10, seed=3)
    x, y = fashion.batch(8, seed=4)
    res = reduce_exclusivity(model, x, y)
    assert res.protected
    report = fedleak.analyze_exclusivity(model, res.inputs, res.labels)
    assert int(report.layers[-1].exans.sum()) == 0 and not report.certifiable.any()


def test_a_deep_nets_first_layer_rows_give_no_sample_away(fashion):
    """Below the last ReLU layer, a first-layer row that one sample alone moves is that sample's input (the
    first-layer attack). With only the last layer protected, that attack rebuilt 29 of 32 sent samples of this
    two-hidden-layer class at 40 dB or more; now neither layer keeps an exclusive row, and nothing is dropped."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    x, y = fashion.batch(8, seed=100)

    def near_copies(inputs, labels):
        update = fedleak.compute_gradient_update(model, inputs, labels)
        rec = fedleak.reconstruct(model, update, attack="first-layer")
        return int((np.nan_to_num(fedleak.metrics.match(rec, inputs, labels).psnr, nan=0.0) >= 40).sum())

    assert near_copies(x, y) >= 4  # the undefended batch leaks through its first layer
    res = reduce_exclusivity(model, x, y)
    assert res.protected and len(res.kept) == 8
    report = fedleak.analyze_exclusivity(model, res.inputs, res.labels)
    assert int(report.layers[0].exans.sum()) == 0 and int(report.layers[-1].exans.sum()) == 0
    assert near_copies(res.inputs, res.labels) == 0
    assert _attack(model, res.inputs, res.labels).num_certified == 0


def test_a_cnns_batch_is_reduced_not_dropped(digits):
    # a CNN's head sits about five times lower than an MLP's: an absolute margin of 0.02 made the LP of every
    # sample of this batch infeasible, and the whole batch was dropped
    model = fedleak.make_convnet(digits.input_shape, 10, channels=(6, 32), padding=1, fc_widths=(256,), seed=0)
    x, y = digits.batch(8, seed=0)
    assert _attack(model, x, y).num_certified >= 1  # the undefended batch leaks
    res = reduce_exclusivity(model, x, y)
    assert res.protected and len(res.kept) == 8 and 0 < res.kappa < 0.02
    assert sum(s.exans_before for s in res.samples) > 8 and float(np.mean(res.linf)) < 0.1
    assert _attack(model, res.inputs, res.labels).num_certified == 0


def test_margin_is_relative_to_the_layers_scale(fashion):
    # the same function with its last ReLU layer ten times larger (and the output layer ten times smaller) asks
    # the same moves of the inputs: kappa scales with the layer, the perturbation does not
    model = fedleak.make_mlp(fashion.input_shape, [512], 10, seed=2)
    big = hidden_layer_scaled(model, 10)
    x, y = fashion.batch(8, seed=5)
    res, res_big = reduce_exclusivity(model, x, y), reduce_exclusivity(big, x, y)
    assert res.protected and res_big.protected and sum(s.exans_before for s in res.samples) > 0
    assert res_big.kappa == pytest.approx(10 * res.kappa, rel=1e-5)
    assert np.array_equal(res.kept, res_big.kept)
    assert [s.status for s in res.samples] == [s.status for s in res_big.samples]
    torch.testing.assert_close(res_big.inputs, res.inputs, atol=2e-4, rtol=0)


def test_transform_and_unprotected_samples_are_dropped(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=1)
    hook = ExclusivityReduction(budget=1e-3)  # too small to fix the ExANs of this batch
    assert isinstance(hook, BatchTransform)
    xd, yd = hook(model, x, y)
    res = hook.last_result
    assert res is not None and res.protected
    assert xd.shape[0] == len(res.kept) == yd.shape[0] < 8
    assert torch.equal(yd, y[torch.from_numpy(res.kept)])
    assert any(s.status == "dropped" and s.message for s in res.samples)


def test_registered_batch_defense_in_a_stack(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(8, seed=0)
    defense = make_defense("exclusivity-reduction", max_exans=1)
    assert isinstance(defense, ExclusivityReduction) and defense.label == "exclusivity-reduction(max_exans=1)"
    assert defense.options == ReductionOptions(max_exans=1)
    assert defense.last_result is None
    out = defended_gradient(model, x, y, defense, seed=0)
    res = defense.last_result  # set on the frozen instance that ran
    assert res is not None and res.protected and res.options.max_exans == 1
    assert torch.equal(out.inputs, res.inputs) and torch.equal(out.labels, res.labels)
    assert _attack(model, out.inputs, out.labels).num_certified == 0
    # after MixUp the labels are soft: the kept rows of them come back
    bound = DefenseStack.of(["mixup", "exclusivity-reduction:max_exans=1"]).bind(data_range=(0, 1))
    assert bound.defenses[1].data_range == (0.0, 1.0)
    mixed = defended_gradient(model, x, y, bound, seed=0)
    assert mixed.labels.is_floating_point() and mixed.labels.shape == (mixed.inputs.shape[0], 10)
    kept = bound.defenses[1].last_result.kept
    assert torch.equal(mixed.labels, defended_gradient(model, x, y, "mixup", seed=0).labels[torch.from_numpy(kept)])


def test_bad_options():
    with pytest.raises(OptionError, match="max_exans"):
        make_defense("exclusivity-reduction", max_exans=-1)
    with pytest.raises(OptionError, match="margin"):
        ExclusivityReduction(margin=0.0)  # checked by ReductionOptions, reported as an option error
    with pytest.raises(OptionError, match="budget"):
        parse_defense("exclusivity-reduction:budget=1.5")
    with pytest.raises(OptionError, match="rounds"):
        parse_defense("exclusivity-reduction:rounds=0")
    with pytest.raises(OptionError, match=r"share must lie in \(0, 1\]"):
        parse_defense("exclusivity-reduction:share=0")
    with pytest.raises(OptionError, match="data_range"):
        ExclusivityReduction(data_range=(1.0, 0.0))
    with pytest.raises(OptionError, match="colour"):
        parse_defense("exclusivity-reduction:colour=red")
    with pytest.raises(OptionError, match="colour"):
        make_defense("exclusivity-reduction", colour="red")
    with pytest.raises(TypeError):
        ExclusivityReduction(colour="red")
