import pytest
import torch
from torch import nn
from user_models import confident_mlp

import fedleak


def _hand_model():
    """One hidden layer of 5 neurons on 2-d inputs with a known activation pattern."""
    model = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0], [2, 0], [0, 1], [0, 3], [1, 1]]))
        model[0].bias.copy_(torch.tensor([0.0, 0, 0, 0, -0.5]))
        model[2].weight.copy_(torch.tensor([[1.0, -1, 2, 0.5, 1], [0.3, 1, -1, 1, 0], [-1, 0.5, 1, -2, 1]]))
    return model


def test_counts_on_a_hand_computed_batch():
    x = torch.tensor([[1.0, 0], [0, 1]])
    report = fedleak.analyze_exclusivity(_hand_model(), x, torch.tensor([0, 2]))
    layer = report.layers[0]
    assert layer.exans.tolist() == [2, 2]  # x1 -> {0,1}, x2 -> {2,3}; neuron 4 fires for both
    assert layer.effective_exans.tolist() == [2, 2]
    assert layer.active.tolist() == [3, 3]
    assert layer.shared_fraction == pytest.approx(0.2) and layer.dead_fraction == 0
    assert report.certifiable.tolist() == [True, True] and report.insecure


def test_a_sample_classified_with_probability_one_has_no_effective_exan(digits):
    """In float32 a saturated sample's probability of its label rounds to 1: its loss vector has no negative entry,
    its exclusive rows read as no sample's, and the attack rebuilds none of them; the analysis said certifiable."""
    model = confident_mlp()
    x, _ = digits.batch(8, seed=0)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[4:] = (pred[4:] + 1) % 10  # the last four labelled wrong: loss vectors with a -1 at the label
    with torch.no_grad():
        p_label = torch.softmax(model(x), 1)[torch.arange(8), y]
    assert (p_label[:4] == 1.0).all()
    report = fedleak.analyze_exclusivity(model, x, y)
    layer = report.layers[-1]
    assert (layer.exans[:4] >= 2).all() and (layer.effective_exans[:4] == 0).all()
    assert not report.certifiable[:4].any() and report.certifiable[4:].sum() >= 2
    assert report.saturated.tolist() == [True] * 4 + [False] * 4
    assert "4 classified with probability 1" in report.summary() and report.to_dict()["saturated"][0]
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    scores = fedleak.metrics.match(rec, x, y)
    assert not scores.recovered[:4].any() and scores.false_certificates == 0


def test_a_neuron_a_sample_classified_with_probability_one_fires_stays_the_other_samples(digits):
    """Such a sample's share of a gradient row vanishes in the client's sum: a neuron it fires with one other sample
    reads as that sample's alone, and the attack certifies samples whose ExANs all are such neurons. Counted by
    which samples fire, the analysis called 6 of 14 samples the attack certified not certifiable."""
    model = confident_mlp()
    x = digits.x[:400]
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[200:] = (pred[200:] + 1) % 10  # half labelled as predicted: probability 1
    for seed in (0, 2):
        idx = torch.randperm(400, generator=torch.Generator().manual_seed(seed))[:24]
        report = fedleak.analyze_exclusivity(model, x[idx], y[idx])
        layer = report.layers[-1]
        assert (layer.effective_exans > layer.exans).any()  # neurons shared with quiet samples count
        rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x[idx], y[idx]))
        scores = fedleak.metrics.match(rec, x[idx], y[idx])
        assert scores.false_certificates == 0 and scores.recovered.sum() >= 10
        assert not (scores.recovered & ~report.certifiable).any()  # every certified sample counted certifiable


def test_adding_a_sample_that_covers_the_exans_makes_the_batch_secure():
    x = torch.tensor([[1.0, 0], [0, 1], [1, 1]])  # the third sample activates every neuron
    report = fedleak.analyze_exclusivity(_hand_model(), x, torch.tensor([0, 2, 1]))
    assert report.layers[0].exans.tolist() == [0, 0, 0]
    assert not report.certifiable.any() and not report.insecure


def test_counts_agree_with_a_brute_force_count_on_real_data(digits):
    model = fedleak.make_mlp(digits.input_shape, [64, 32], 10, seed=1)
    x, y = digits.batch(12, seed=4)
    report = fedleak.analyze_exclusivity(model, x, y)
    h = x.reshape(12, -1)
    for k, layer_idx in enumerate([1, 3]):
        pre = model[layer_idx](h)
        active = (pre > 0).numpy()
        expected = [(active[m] & (active.sum(0) == 1)).sum() for m in range(12)]
        assert report.layers[k].exans.tolist() == expected
        h = torch.relu(pre)
    counts = report.exan_counts
    assert counts.shape == (12, 2)
    assert report.certifiable.tolist() == ((counts[:, 1] >= 2) & (counts[:, 0] >= 1)).tolist()


def test_exclusivity_falls_with_batch_size(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    fractions = []
    for m in (4, 64):
        x, y = fashion.batch(m, seed=0)
        fractions.append(fedleak.analyze_exclusivity(model, x, y, peel=False).certifiable_fraction)
    assert fractions[0] > fractions[1]


def test_report_serialises(digits):
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    d = fedleak.analyze_exclusivity(model, x, y).to_dict()
    assert d["batch_size"] == 4 and len(d["layers"]) == 1 and len(d["layers"][0]["exans"]) == 4
    assert "certifiable" in fedleak.analyze_exclusivity(model, x, y).summary()


def test_bad_inputs(digits):
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    with pytest.raises(fedleak.FedleakError, match="batch is empty"):
        fedleak.analyze_exclusivity(model, digits.x[:0])
    with pytest.raises(fedleak.ModelError, match="does not run on inputs of shape \\(1, 5, 5\\)"):
        fedleak.analyze_exclusivity(model, torch.zeros(2, 1, 5, 5))
    with pytest.raises(fedleak.FedleakError, match="labels"):
        fedleak.analyze_exclusivity(model, digits.x[:2], torch.tensor([0, 10]))
    bad = digits.x[:2].clone()
    bad[1, 0, 1, 1] = float("inf")
    with pytest.raises(fedleak.FedleakError, match="NaN or inf"):
        fedleak.analyze_exclusivity(model, bad)
    with pytest.raises(fedleak.ModelError):
        fedleak.analyze_exclusivity(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits.x[:2])
