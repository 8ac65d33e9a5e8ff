"""Fishing's default least-L2 norm, its PSNR floor (``min_psnr``), the L-infinity ``budget`` with samples that
stand aside, and per-sample LPs in forked worker processes (``workers``, :func:`fedleak.fishing.pool.parallel_map`)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import SolverError
from fedleak.fishing import FishingOptions, FishingTransform, fish
from fedleak.fishing import fisher as fisher_module
from fedleak.fishing.pool import parallel_map, resolve_workers

STATUSES = {"fished", "budget", "blocked", "no_target", "infeasible", "unsatisfied", "time_limit"}
ASIDE = "moved only to keep the other samples' target neurons off"


@pytest.fixture(scope="module")
def shallow(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [512], 10, seed=0)
    x, y = fashion.batch(32, seed=1)
    return model, x, y


@pytest.fixture(scope="module")
def unconstrained(shallow):
    model, x, y = shallow
    return fish(model, x, y, workers=1)


def _consistent(res, x) -> None:
    """Statuses are known, every sample not fished says why, and a fished sample is certifiable. (A sample that is
    not fished may be certifiable after all: the others moved off the neurons it fires, or its move aside left it
    some of its own.)"""
    for s in res.samples:
        assert s.status in STATUSES, s.status
        if s.status == "fished":
            assert s.certifiable_after and s.message == ""  # (a sample whose targets are free is not moved)
        else:
            assert s.message
            if not s.perturbed:
                assert torch.equal(res.inputs[s.index], x[s.index])
    assert res.fished_fraction >= np.mean([s.status == "fished" for s in res.samples])


def _targets_exclusive_in_float32(model, res) -> None:
    """Every fished sample's targets fire for it alone (float32, as the client computes), whatever the
    samples that were not fished did."""
    lin = model[1]
    z = res.inputs.reshape(res.batch_size, -1) @ lin.weight.detach().T + lin.bias.detach()
    kappa = res.kappa
    for s in res.samples:
        if s.status != "fished":
            continue
        for j in s.targets[0]:
            col = z[:, j]
            assert float(col[s.index]) >= 0.5 * kappa
            assert float(torch.cat([col[: s.index], col[s.index + 1:]]).max()) <= -0.5 * kappa


# --- the default norm: least L2 ------------------------------------------------------------------------


def test_default_norm_is_l2(unconstrained):
    assert FishingOptions().norm == "l2"
    assert unconstrained.options.norm == "l2"


def test_l2_gives_higher_mean_psnr_than_linf(shallow, unconstrained):
    model, x, y = shallow
    linf = fish(model, x, y, norm="linf", workers=1)
    assert unconstrained.fished_fraction == 1.0 and linf.fished_fraction == 1.0
    assert all(s.status == "fished" for s in unconstrained.samples + linf.samples)
    assert float(unconstrained.psnr.mean()) >= float(linf.psnr.mean())
    # least L2 is not least L-infinity: the L-infinity LP has the smaller largest pixel change
    assert float(linf.linf.max()) <= float(unconstrained.linf.max())


# --- the PSNR floor ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [42.0, 50.0])
def test_min_psnr_floor(shallow, unconstrained, floor):
    model, x, y = shallow
    mean = float(unconstrained.psnr.mean())
    assert float(unconstrained.psnr.min()) < floor  # the floor binds
    res = fish(model, x, y, min_psnr=floor, workers=1)
    assert res.options.min_psnr == floor
    for s in res.samples:
        if s.perturbed:  # fished or moved only to stay off the others' targets: both within the floor
            assert s.psnr >= floor - 1e-9
    _consistent(res, x)
    _targets_exclusive_in_float32(model, res)
    assert res.fished_fraction < unconstrained.fished_fraction == 1.0
    over = [s for s in res.samples if s.status == "budget" and "below the floor" in s.message]
    assert over and all(f"{floor:g} dB" in s.message for s in over)
    if floor < mean:
        assert any(s.status == "fished" for s in res.samples)


@pytest.mark.parametrize("bad", [0, 0.0, -1, -1.0, float("nan"), float("inf")])
def test_invalid_min_psnr_raises(digits, bad):
    with pytest.raises(SolverError, match="min_psnr"):
        FishingOptions(min_psnr=bad)
    with pytest.raises(SolverError, match="min_psnr"):
        FishingTransform(min_psnr=bad)
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(4, seed=1)
    with pytest.raises(SolverError, match="min_psnr"):
        fish(model, x, y, min_psnr=bad)


# --- an L-infinity budget: samples that cannot own targets stand aside ---------------------------------------


@pytest.fixture(scope="module")
def tight(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [512], 10, seed=0)
    x, y = fashion.batch(16, seed=1)
    return model, x, y, fish(model, x, y, budget=0.005, workers=1)


def test_budget_failures_stand_aside_or_stay_unperturbed(tight):
    model, x, y, res = tight
    failed = [s for s in res.samples if s.status != "fished"]
    assert failed and len(failed) < len(res.samples)
    for s in failed:
        assert (not s.perturbed) or ASIDE in s.message
    assert any(s.perturbed for s in failed)  # at least one sample was moved only to stand aside
    assert all(s.linf <= 0.005 * (1 + 1e-5) for s in res.samples)  # the budget holds for everyone
    _consistent(res, x)
    _targets_exclusive_in_float32(model, res)


# --- workers -----------------------------------------------------------------------------------------------


def _square(i: int) -> int:
    time.sleep(0.002 * (10 - i % 10))  # early items finish last
    return i * i


def _pid(i: int) -> tuple[int, int]:
    return i, os.getpid()


def _boom(i: int) -> int:
    if i == 5:
        raise ValueError("item five")
    return i


def test_parallel_map_keeps_order():
    items = list(range(20))
    assert parallel_map(_square, items, 2) == [i * i for i in items]
    assert parallel_map(_square, items, 1) == [i * i for i in items]
    assert parallel_map(_square, [], 2) == []


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="workers fork on Linux only")
def test_parallel_map_forks_workers_only_when_it_pays():
    me = os.getpid()
    out = parallel_map(_pid, list(range(8)), 2)
    assert [i for i, _ in out] == list(range(8))
    assert all(pid != me for _, pid in out)  # solved in worker processes
    assert all(pid == me for _, pid in parallel_map(_pid, list(range(8)), 1))
    assert all(pid == me for _, pid in parallel_map(_pid, list(range(3)), 2))  # fewer than two items per worker
    # the task is inherited by fork, not pickled: a closure works
    offset = 1000
    assert parallel_map(lambda i: i + offset, list(range(10)), 2) == [i + offset for i in range(10)]


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="workers fork on Linux only")
def test_parallel_map_reraises_and_resets():
    from fedleak.fishing import pool

    with pytest.raises(ValueError, match="item five"):
        parallel_map(_boom, list(range(10)), 2)
    assert pool._TASK is None
    assert parallel_map(_square, list(range(6)), 2) == [i * i for i in range(6)]


def test_worker_defaults():
    assert FishingOptions().workers is None
    assert FishingTransform().options.workers == 1
    assert FishingTransform(workers=3).options.workers == 3
    assert resolve_workers(3) == 3
    assert resolve_workers(None) == len(os.sched_getaffinity(0))
    with pytest.raises(SolverError, match="workers"):
        FishingOptions(workers=0)


def test_fish_defaults_to_one_worker_per_core(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(4, seed=1)
    assert fish(model, x, y).options.workers is None


def _same(a, b) -> None:
    assert torch.equal(a.inputs, b.inputs)
    drop = ("lp_seconds", "lp_floor_seconds")
    assert [{k: v for k, v in s.to_dict().items() if k not in drop} for s in a.samples] == \
           [{k: v for k, v in s.to_dict().items() if k not in drop} for s in b.samples]


@pytest.mark.parametrize("case", ["deep", "budget"])
def test_workers_give_bit_identical_results(fashion, tight, monkeypatch, case):
    calls = []
    real = fisher_module.parallel_map

    def spy(task, items, workers):
        calls.append((len(items), workers))
        return real(task, items, workers)

    monkeypatch.setattr(fisher_module, "parallel_map", spy)
    if case == "deep":  # two hidden layers, everything fished
        model = fedleak.make_mlp(fashion.input_shape, [512, 128], 10, seed=0)
        x, y = fashion.batch(12, seed=2)
        one = fish(model, x, y, workers=1)
        assert one.fished_fraction == 1.0
    else:  # repairs and samples standing aside
        model, x, y, one = tight
    calls.clear()
    two = fish(model, x, y, budget=one.options.budget, workers=2)
    assert any(n >= 4 and w == 2 for n, w in calls)  # the batch's LPs did go to two forked workers
    assert two.options.workers == 2
    _same(one, two)
