"""The plan's typed parts, its JSON-ready dict and its text."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import fedleak
from fedleak.plan import AttackAdvice, ConvBlockPlan, DenseLayerPlan, Plan


@pytest.fixture(scope="module")
def cnn_plan(digits):
    model = fedleak.make_convnet((1, 8, 8), 10, channels=(4,), pool="max", fc_widths=(64, 32), seed=0)
    return fedleak.plan(model, None, digits, batch_sizes=[1, 4], max_samples=300, name="small-cnn")


def test_typed_frozen_parts(cnn_plan):
    assert isinstance(cnn_plan, Plan)
    assert all(isinstance(b, ConvBlockPlan) for b in cnn_plan.blocks)
    assert all(isinstance(d, DenseLayerPlan) for d in cnn_plan.dense)
    assert all(isinstance(a, AttackAdvice) for a in cnn_plan.attacks)
    assert cnn_plan.layers == (*cnn_plan.blocks, *cnn_plan.dense)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cnn_plan.route = "applies"
    assert [d.need for d in cnn_plan.dense] == [1, 2] and [d.last for d in cnn_plan.dense] == [False, True]
    assert {a.name for a in cnn_plan.attacks} == set(fedleak.available_attacks())
    assert not [a.name for a in cnn_plan.attacks if "no advice rule" in a.why]  # every built-in attack has its rule


def test_dict_is_json_ready_and_complete(cnn_plan):
    data = json.loads(json.dumps(cnn_plan.to_dict()))
    assert data["verdict"] == cnn_plan.verdict and data["route"] == cnn_plan.route
    assert [b["name"] for b in data["blocks"]] == [b.name for b in cnn_plan.blocks]
    assert data["blocks"][0]["in_shape"] == [1, 8, 8] and data["evidence"]["measured"] is True
    assert [layer["reason"] for layer in data["layers"]] == [layer.reason() for layer in cnn_plan.layers]
    assert data["update"] is None


def test_text_leads_with_the_verdict_and_aligns_its_tables(cnn_plan):
    text = cnn_plan.to_text()
    lines = text.splitlines()
    assert lines[0] == f"VERDICT: {cnn_plan.verdict}"
    start = lines.index(next(line for line in lines if line.startswith("Batch sizes")))
    table = lines[start + 1:start + 4]  # header and one row per batch size
    assert len({len(row) for row in table}) == 1  # right-aligned columns end together
    assert "largest batch size with at least 95% certifiable" in text
    for advice in cnn_plan.attacks:
        assert f"{'+' if advice.recommended else '-'} {advice.name}" in text


def test_without_inputs_the_assumption_is_stated():
    plan = fedleak.plan(fedleak.make_mlp(16, [64], 3, seed=0), batch_sizes=[2])
    assert not plan.evidence.measured and "synthetic inputs" in plan.evidence.description
    assert "uniform in [0, 1]" in plan.to_text()


def test_fedleak_plan_is_the_function_whichever_import_comes_first():
    code = ("from fedleak.plan import Plan\nimport fedleak\nimport fedleak.plan\n"
            "p = fedleak.plan(fedleak.make_mlp(4, [8], 2), batch_sizes=[1])\nassert isinstance(p, Plan)\n"
            "assert fedleak.Plan is Plan\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": [0]}, r"batch size must lie in \[1, 65,536\], got 0"),
    ({"target": 0.2}, "target must lie in"),
    ({"inputs": "x"}, "inputs must be a torch tensor, got str"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(fedleak.FedleakError, match=message):
        fedleak.plan(fedleak.make_mlp(4, [8], 2), **kwargs)


def test_search_advice_is_told_the_range_of_inputs_off_the_unit_box(digits):
    """Inputs normalised to [-1, 1] (a data set's value_range, or a tensor's values): the recommended searches that
    read the data's range are told to take it, on a model the exact route reads and on one it does not; inputs in
    [0, 1], and no inputs at all, add nothing."""
    import torch
    from user_models import GeluMLP

    flower = digits.normalized(0.5, 0.5)
    x, y = flower.batch(4, seed=0)
    torch.manual_seed(0)
    for model in (GeluMLP(64, 32, 10).eval(), fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)):
        update = fedleak.compute_gradient_update(model, x, y)
        for inputs in (flower, flower.x[:300]):
            told = {a.name: a.why for a in fedleak.plan(model, update, inputs).attacks if a.recommended}
            searches = {name for name in told if name in ("ig", "auto", "dlm", "dlm+")}
            assert searches and all("the inputs lie in [-1, 1], off its default box [0, 1]: give it "
                                    "data_range=(-1, 1)" in told[name] for name in searches)
            assert all("default box" not in why for name, why in told.items() if name not in searches)
        for inputs in (digits, None):
            assert not any("default box" in a.why for a in fedleak.plan(model, update, inputs).attacks)
