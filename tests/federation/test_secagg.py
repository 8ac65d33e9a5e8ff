"""Audits under Flower's SecAgg+ (secaggplus_mod + SecAggPlusWorkflow, real Flower on Ray): the server holds only
the aggregate, and the audit attacks it as one update of the union of the clients' batches."""

import json

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import OptionError
from fedleak.federation import FederationSettings

pytest.importorskip("flwr")
pytest.importorskip("ray")

DIGITS = {"data": "digits", "hidden": (256,), "batch_size": 8, "test_size": 200, "public_size": 100}
# float64 uploads, a clipping range above every upload entry, the most levels 3 clients allow
TIGHT = {"secagg_clipping_range": 0.1, "secagg_quantization_range": 2**30, "secagg_max_weight": 8,
         "secagg_upload_dtype": "float64"}


def test_bad_secagg_settings_fail_in_one_line(capsys):
    with pytest.raises(OptionError, match="quantization_range .* overflows the 2\\*\\*32 modulus with 4 clients"):
        FederationSettings(secagg=True, clients=4, secagg_quantization_range=2**30)
    with pytest.raises(OptionError, match="num_shares"):
        FederationSettings(secagg=True, clients=4, secagg_shares=2)
    with pytest.raises(OptionError, match="reconstruction_threshold"):
        FederationSettings(secagg=True, clients=4, secagg_shares=3, secagg_threshold=3)
    with pytest.raises(OptionError, match="at least 2 clients"):
        FederationSettings(secagg=True, clients=1)
    with pytest.raises(OptionError, match="central-dp"):
        FederationSettings(secagg=True, defenses=("central-dp:noise_multiplier=0.1,clip=1",))
    FederationSettings(secagg=False, clients=1, secagg_quantization_range=2**30)  # unchecked when off
    from fedleak.cli import main

    assert main(["federate", "--secagg", "--secagg-upload-dtype", "float16", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "upload dtype" in err and "Traceback" not in err


def test_quantization_bound_covers_flowers_quantizer():
    """The bound the server derives from its settings holds for Flower's own quantizer, float32 and float64."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedleak.federation.secagg_config import SecAggConfig

    gen = np.random.default_rng(0)
    uploads = [gen.normal(0, 3e-3, 5000).astype(np.float32) for _ in range(3)]
    exact = np.mean([u.astype(np.float64) for u in uploads], axis=0)
    for dtype, T in (("float32", 2**22), ("float32", 2**29), ("float64", 2**29)):
        cfg = SecAggConfig(clipping_range=0.05, quantization_range=T, max_weight=8, upload_dtype=dtype)
        total = sum(quantize([u.astype(dtype) * cfg.weight(8)], 0.05, T)[0].astype(np.int64) for u in uploads)
        agg = (dequantize([total], 0.05, T)[0] - 2 * 0.05) / (3 * cfg.weight(8))
        err = float(np.abs(agg - exact).max())
        assert err <= cfg.error_bound((8, 8, 8))
    loose = SecAggConfig(clipping_range=0.05, quantization_range=2**29, upload_dtype="float32").error_bound((8,) * 3)
    tight = SecAggConfig(clipping_range=0.05, quantization_range=2**29, upload_dtype="float64").error_bound((8,) * 3)
    assert tight < loose / 50  # float32 uploads cap the quantizer's precision whatever the levels


def test_imprint_under_secagg_recovers_samples_of_several_clients_from_the_aggregate(ray_cluster):
    """3 clients x 1 round of real SecAgg+: the server's Grid carries masked vectors only, the strategy gets one
    aggregate, and the imprint attack on it certifies samples of more than one client, every one true."""
    from fedleak.federation import run_federation
    from fedleak.federation.report import render_report

    settings = FederationSettings(clients=3, rounds=1, threat="imprint", secagg=True, seed=0, **DIGITS, **TIGHT,
                                  ray_address=ray_cluster[0])
    result = run_federation(settings)
    import ray

    assert not ray.is_initialized()
    assert result.records == ()  # no per-client record: there is no individual update
    (agg,) = result.aggregates
    assert agg.status == "ok" and agg.attack == "imprint" and len(agg.shares) == 3
    view = agg.view
    assert view.masked_vectors == 3 and view.plain_arrays == 0 and view.aggregates == 1
    assert view.replies == 4 * 3  # four SecAgg+ stages, three clients
    assert agg.num_examples == 24 and agg.scores.batch_size == 24
    assert agg.certified >= 2 and agg.scores.false_certificates == 0
    assert agg.scores.recovered == agg.certified  # every certificate is a true sample of the round
    assert sum(s.recovered for s in agg.shares) == agg.scores.recovered
    assert agg.clients_touched >= 2
    q = agg.quantization
    assert q.clipped == 0 and 0 < q.max_error <= q.bound  # the measured SecAgg+ error is within the server's bound
    d = result.to_dict()
    assert d["audit_unit"] == "round aggregate" and d["records"] == []
    rec = d["aggregates"][0]
    assert rec["unit"].startswith("round aggregate") and rec["server_view"]["plain_arrays"] == 0
    assert rec["recovered_fraction"] == pytest.approx(agg.scores.recovered / 24)
    assert d["settings"]["secagg"] is True and d["settings"]["secagg_upload_dtype"] == "float64"
    assert d["rounds"][1]["clients_ok"] == 3
    json.dumps(d)
    html = render_report(result)
    assert "aggregate" in html


def test_honest_but_curious_attack_on_a_secagg_aggregate_reports_its_figures():
    """The exclusivity attack on an aggregate quantized by Flower's own quantizer, as one update of the union batch:
    whatever it gets is reported, scored against every client's samples, with the quantization error measured."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from fedleak.federation.aggregate_audit import AggregateInput, run_aggregate_audit
    from fedleak.federation.aggregate_record import ClientShare
    from fedleak.federation.audit_worker import AuditPlan
    from fedleak.federation.results import Scores
    from fedleak.federation.secagg_config import SecAggConfig

    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, [256], data.num_classes, seed=0)
    batches = [data.batch(4, seed=s) for s in range(3)]
    deltas = [{k: 0.1 * v for k, v in fedleak.compute_gradient_update(model, x, y).gradients.items()} for x, y in batches]
    cfg = SecAggConfig(clipping_range=0.1, quantization_range=2**30, max_weight=4, upload_dtype="float64")
    names = list(deltas[0])
    aggregate = {}
    for k in names:
        total = sum(quantize([d[k].double().numpy()], 0.1, 2**30)[0].astype(np.int64) for d in deltas)
        aggregate[k] = torch.from_numpy((dequantize([total], 0.1, 2**30)[0] - 2 * 0.1) / 3)
    union_x = torch.cat([x for x, _ in batches])
    union_y = torch.cat([y for _, y in batches])

    def scorer(job, rec):
        from fedleak.federation.aggregate_audit import AggregateScores
        from fedleak.metrics import match

        m = match(rec, union_x, union_y, data_range=data.value_range)
        scores = Scores(12, int(m.recovered.sum()), m.recovered_fraction, m.mean_psnr(), None, m.label_accuracy,
                        m.false_certificates)
        return AggregateScores(scores, tuple(int(m.recovered[i * 4:(i + 1) * 4].sum()) for i in range(3)))

    shares = tuple(ClientShare(100 + i, i, 4) for i in range(3))
    job = AggregateInput(1, model, {k: v.float() for k, v in aggregate.items()}, shares, cfg, "delta", aggregate,
                         {"local_steps": 1}, data.value_range)
    rec = run_aggregate_audit(AuditPlan(), job, scorer)
    assert rec.status == "ok" and rec.attack == "exclusivity" and rec.num_examples == 12
    assert "12 examples in 1 local step" in rec.update_kind
    assert rec.scores is not None and rec.scores.false_certificates == 0
    assert rec.scores.recovered == rec.certified <= 12
    assert sum(s.recovered for s in rec.shares) == rec.scores.recovered
    assert rec.quantization.bound == pytest.approx(cfg.error_bound((4, 4, 4)))
    out = rec.to_dict()
    for key in ("recovered_fraction", "clients_touched", "psnr", "quantization"):
        assert key in out


def test_the_aggregate_of_a_batch_norm_model_is_attacked_on_its_parameters():
    """A state dict's integer counter (BatchNorm's num_batches_tracked) is in the aggregate SecAgg+ returns: the
    attack takes the parameters (it was an 'attack-error' every round: an integer entry is no gradient)."""
    from torch import nn

    from fedleak.federation.aggregate_audit import AggregateInput, run_aggregate_audit
    from fedleak.federation.aggregate_record import ClientShare
    from fedleak.federation.audit_worker import AuditPlan
    from fedleak.federation.secagg_config import SecAggConfig

    data = fedleak.load_dataset("digits")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x, y = data.batch(4, seed=0)
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    delta = {k: 0.1 * grads[k] if k in grads else torch.zeros_like(v, dtype=torch.float32)
             for k, v in model.state_dict().items()}
    delta["1.num_batches_tracked"] = torch.tensor(1.0)
    job = AggregateInput(1, model, delta, (ClientShare(100, 0, 4),), SecAggConfig(), "delta",
                         {k: v.double() for k, v in delta.items()}, {"local_steps": 1}, data.value_range)
    rec = run_aggregate_audit(AuditPlan("exclusivity", {"input_shape": (1, 8, 8)}), job, None)
    # attacked (it was an error); SecAgg+'s quantization bound (its float32 floor alone is about 3e-7 R per entry)
    # enters the head's tolerances and the features' proven error, far above what a certificate allows: none certified
    assert rec.status == "ok" and rec.attack == "exclusivity", rec.detail
    assert rec.certified == 0 and "dtype" not in rec.detail
