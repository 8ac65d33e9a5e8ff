"""Why a sent sample was not rebuilt, in words, from the batch's exclusivity analysis."""

from __future__ import annotations

import torch
from user_models import confident_mlp

import fedleak
from fedleak.report.samples import sample_reasons, why_not_rebuilt


def test_a_sample_classified_with_probability_one_is_said_to_be(digits):
    model = confident_mlp()
    x, _ = digits.batch(8, seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[4:] = (y[4:] + 1) % 10  # the first four: labelled as predicted, probability 1
    report = fedleak.analyze_exclusivity(model, x, y)
    assert "classifies it with probability 1" in why_not_rebuilt(report, 0)
    assert report.saturated[0] and "probability 1" not in why_not_rebuilt(report, 4)


def test_every_sent_sample_classified_with_probability_one_says_so(digits):
    """Missing, or paired with an uncertified input of the attack (a blend), the reason starts with why."""
    model = confident_mlp()
    x, _ = digits.batch(8, seed=0)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[4:] = (y[4:] + 1) % 10
    report = fedleak.analyze_exclusivity(model, x, y)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    status, reasons = sample_reasons(report, rec, fedleak.metrics.match(rec, x, y))
    assert all(s != "certified" and "classifies it with probability 1" in r for s, r in zip(status[:4], reasons))
    assert status[4:] == ["certified"] * 4
