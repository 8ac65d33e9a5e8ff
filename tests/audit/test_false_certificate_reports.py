"""The federation's evaluation scorer and report count every certified sample, on the data's range."""

import json
from types import SimpleNamespace

import numpy as np
import torch

import fedleak
from fedleak.federation.ground_truth import GroundTruthScorer, TrueBatch, read_true_batch, write_true_batch
from fedleak.federation.report import render_report
from fedleak.federation.results import ClientRecord, FederationResult, RoundRecord


def _lying_reconstruction(x, y):
    """The true batch, certified, plus a certified blend beyond it (as in the two-class false certificate)."""
    blend = 0.5 * x[0] + 0.5 * x[1]
    return fedleak.Reconstruction(inputs=torch.cat([x, blend[None]]), labels=torch.cat([y, y[:1]]),
                                  certified=torch.ones(len(x) + 1, dtype=torch.bool), attack="lying")


def test_ground_truth_scorer_counts_a_certified_blend_beyond_the_batch(tmp_path, digits):
    x = 255 * digits.x[:3]  # raw 0..255 pixels: the range travels with the batch
    y = digits.y[:3]
    write_true_batch(tmp_path, 1, 7, TrueBatch(x, x, y, partition=0, value_range=(0.0, 255.0)))
    assert read_true_batch(tmp_path, 1, 7).value_range == (0.0, 255.0)
    rec = _lying_reconstruction(x, y)
    rec = fedleak.Reconstruction(inputs=rec.inputs + 0.01, labels=rec.labels, certified=rec.certified,
                                 attack="lying")  # 0.01 < 1e-4 x 255: exact on this range
    scores = GroundTruthScorer(tmp_path)(SimpleNamespace(server_round=1, node_id=7), rec)
    assert scores.recovered == 3 and scores.recovered_fraction == 1.0
    assert scores.false_certificates == 1 and "matches no original" in scores.false_certificate_reasons[0]
    assert scores.value_range == (0.0, 255.0)
    assert [p[2] for p in scores.preview] == ["certified", "certified", "certified", "false"]
    assert scores.preview[3][0] is None and float(scores.preview[0][1].max()) > 200  # not clamped to [0, 1]
    record = ClientRecord.from_attack(1, 7, 0, 3, rec, 0.1, scores)
    d = record.to_dict()
    assert d["false_certificates"] == 1 and d["value_range"] == [0.0, 255.0]
    assert "matches no original" in d["false_certificate_reasons"][0]
    result = FederationResult({"threat": "honest", "defense": "none"}, {"fedleak": "test"},
                              (RoundRecord(1, 0.5, 1.0, 1.0, 1, 0),), (record,), 1.0, 0.0)
    page = render_report(result)
    assert "1 FALSE CERTIFICATE(S)" in page and '<td class="bad">1</td>' in page and "matches no original" in page
    assert "[0, 255]" in page
    json.dumps(result.to_dict())


def test_ground_truth_scorer_without_a_range_uses_the_option_or_the_batch(tmp_path, digits):
    x, y = digits.x[:2], digits.y[:2]
    write_true_batch(tmp_path, 2, 1, TrueBatch(x, x, y, partition=1))
    rec = fedleak.Reconstruction(inputs=x + 1.5e-4, labels=y, certified=torch.ones(2, dtype=torch.bool),
                                 attack="t")
    job = SimpleNamespace(server_round=2, node_id=1)
    assert GroundTruthScorer(tmp_path)(job, rec).false_certificates == 2  # range [0, 1]: 1.5e-4 > 1e-4
    wide = GroundTruthScorer(tmp_path, data_range=(-1.0, 1.0))(job, rec)
    assert wide.false_certificates == 0 and wide.recovered == 2 and np.isfinite(wide.psnr)


def test_ground_truth_scorer_scores_normalised_data_in_pixels(tmp_path):
    """Data the model sees normalised per channel is scored as the audit scores it: in pixels on the pixels'
    range. On the normalised values' range (the channels' union, 10.8 wide here) an error of 5e-4 in the model's
    units passed for exact, and PSNR rose by 11 dB."""
    retina = fedleak.load_dataset("retina")
    norm = fedleak.normalization((0.1, 0.5, 0.9), (0.1, 0.3, 0.5))
    x, y = norm.apply(retina.x[:3].double()).float(), retina.y[:3]
    assert norm.input_range == (-1.8, 9.0)
    write_true_batch(tmp_path, 1, 4, TrueBatch(x, x, y, partition=0, value_range=norm.input_range))
    job = SimpleNamespace(server_round=1, node_id=4)
    off = fedleak.Reconstruction(inputs=x + 5e-4, labels=y, certified=torch.ones(3, dtype=torch.bool), attack="t")
    scores = GroundTruthScorer(tmp_path, normalization=norm)(job, off)
    assert scores.value_range == (0.0, 1.0) and scores.recovered == 0 and scores.false_certificates == 3
    want = fedleak.metrics.match(off, x, y, normalization=norm)
    union = fedleak.metrics.match(off, x, y, data_range=norm.input_range)
    assert int(union.recovered.sum()) == 3  # what the union's range called exact
    assert scores.psnr == want.mean_psnr() and scores.psnr < union.mean_psnr() - 10
    original, rebuilt = scores.preview[0][:2]  # shown in pixels, as scored
    assert np.allclose(original, retina.x[0].numpy(), atol=1e-5) and np.allclose(rebuilt, original, atol=3e-4)
    exact = fedleak.Reconstruction(inputs=x.clone(), labels=y, certified=torch.ones(3, dtype=torch.bool),
                                   attack="t")
    assert GroundTruthScorer(tmp_path, normalization=norm)(job, exact).recovered == 3
