"""Exclusivity reduction on real data: no sample of a defended batch is certified, at a measured cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedleak
from fedleak.defenses import ExclusivityReduction, reduce_exclusivity
from fedleak.errors import SolverError
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


def test_bad_options():
    with pytest.raises(SolverError, match="max_exans"):
        ExclusivityReduction(max_exans=-1)
    with pytest.raises(SolverError, match="unknown"):
        ExclusivityReduction(colour="red")
