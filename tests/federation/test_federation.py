"""Audited federations on the real Flower simulation engine (Ray), offline; plus the parts without Flower."""

import dataclasses
import json
import os
import tempfile

import numpy as np
import pytest
import torch

import fedleak
from fedleak.federation import FederationSettings, partition_indices

pytest.importorskip("flwr")
pytest.importorskip("ray")


def test_importing_fedleak_does_not_import_flower():
    import subprocess
    import sys

    code = "import sys, fedleak, fedleak.federation; print('flwr' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_partitions_are_disjoint_and_complete():
    y = fedleak.load_dataset("digits").y
    for scheme in ("iid", "label-skew"):
        parts = partition_indices(y, 5, scheme, seed=1, alpha=0.3, min_size=8)
        joined = np.concatenate(parts)
        assert len(joined) == len(y) and len(np.unique(joined)) == len(y)
    skew = partition_indices(y, 5, "label-skew", seed=1, alpha=0.1, min_size=8)
    iid = partition_indices(y, 5, "iid", seed=1)
    classes = lambda parts: np.mean([len(np.unique(y.numpy()[p])) for p in parts])  # noqa: E731
    assert classes(skew) < classes(iid)
    with pytest.raises(fedleak.FedleakError, match="partition"):
        partition_indices(y, 3, "by-writer")


def test_settings_reject_bad_values_and_round_trip():
    with pytest.raises(fedleak.FedleakError, match="clients"):
        FederationSettings(clients=0)
    with pytest.raises(fedleak.FedleakError, match="bad fault"):
        FederationSettings(inject_faults=("explode:1",))
    s = FederationSettings(hidden=(64, 32), transform_options=(("targets_last", 3),))
    assert FederationSettings.from_json(s.to_json()) == s


def test_local_update_is_one_sgd_step_on_the_reported_batch():
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model

    s = FederationSettings(data="digits", hidden=(64,), batch_size=8, test_size=200, public_size=100)
    split = data_split(s.data, s.test_size, s.public_size)
    model = make_model(s, split)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = local_update(model, s, partition_id=1, server_round=1)
    assert res.num_examples == 8 and res.steps == 1 and res.inputs.shape == (8, 1, 8, 8)
    # the step is lr times the mean-loss gradient of exactly the reported batch
    fresh = make_model(s, split)
    grad = fedleak.compute_gradient_update(fresh, res.inputs, res.labels)
    for name, g in grad.gradients.items():
        assert torch.allclose(before[name] - res.weights[name], s.lr * g, atol=1e-6)
        assert torch.allclose(res.delta[name], s.lr * g, rtol=1e-5, atol=1e-9)  # the uploaded change


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def test_honest_federation_with_a_failing_and_a_malformed_client(private_tempdir):
    """3 clients x 2 rounds on Fashion-MNIST; client 1 raises in round 1, client 2 sends NaN in round 2."""
    from fedleak.federation import run_federation
    from fedleak.federation.report import render_report

    settings = FederationSettings(clients=3, rounds=2, threat="honest", batch_size=8, hidden=(256,), lr=0.1,
                                  inject_faults=("fail:1@1", "malformed:2@2"))
    result = run_federation(settings)
    assert not _ray_running()
    assert tempfile.gettempdir() == private_tempdir  # the run's folder was made here, and is gone
    assert not [p for p in os.listdir(private_tempdir) if p.startswith("fedleak-fl-")]
    by = {(r.round, r.client): r for r in result.records}
    assert by[(1, 1)].status == "failed" and "injected failure" in by[(1, 1)].detail
    assert by[(2, 2)].status == "malformed" and "non-finite" in by[(2, 2)].detail
    ok = [r for r in result.records if r.status == "ok"]
    assert len(ok) == 4  # 6 (round, client) pairs minus the two skipped: no result lost
    for r in ok:
        assert r.scores is not None and r.scores.batch_size == 8 and r.attack == "exclusivity"
    # batch 8 on a 256-wide net: natural exclusivity exposes most samples
    assert np.mean([r.scores.recovered_fraction for r in ok]) >= 0.5
    acc = [r.test_accuracy for r in result.rounds]
    assert len(acc) == 3 and acc[2] > acc[0]  # the NaN update did not poison the model
    d = result.to_dict()
    rec = d["records"][0]
    for key in ("round", "client", "recovered_fraction", "psnr", "label_accuracy", "attack_seconds", "test_accuracy"):
        assert key in rec
    json.dumps(d)
    assert "data:image/png;base64," in render_report(result)


def test_cli_federate_imprint(tmp_path, capsys, ray_cluster):
    from fedleak.cli import main

    out = tmp_path / "run"
    code = main(["federate", "--clients", "2", "--rounds", "1", "--threat", "imprint", "--batch-size", "16",
                 "--hidden", "500", "--seed", "1", "--lr-unknown", "--ray-address", ray_cluster[0], "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "results.json"]
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    assert [(r["round"], r["client"]) for r in recs] == [(1, 0), (1, 1)]
    for r in recs:
        assert r["recovered_fraction"] >= 0.5 and r["false_certificates"] == 0
    assert res["settings"]["threat"] == "imprint" and res["versions"]["flwr"].startswith("1.41")
    assert res["settings"]["lr_known"] is False  # --lr-unknown: the server's attack does not take the rate
    html = (out / "report.html").read_text()
    assert "<img src=\"data:image/png;base64," in html and "://" not in html.split("<body>")[1]  # offline: no links (base64 has no colon)
    assert not _ray_running()


def test_a_class_fishing_server_certifies_every_sample_of_its_class(ray_cluster):
    """The class-fishing threat: the server sends its fished output layer every round and attacks each one-step
    update with the learning rate it set; every sample of the fished class is certified, no other."""
    from fedleak.federation import run_federation

    settings = FederationSettings(clients=2, rounds=1, threat="class-fishing", fished_class=1, batch_size=32,
                                  hidden=(512,), lr=0.1, seed=0, ray_address=ray_cluster[0])
    for unknown in ({"lr_known": False}, {"local_steps": 2}, {"local_epochs": 1}):
        with pytest.raises(fedleak.FedleakError, match="class-fishing server reads each update at the learning rate"):
            dataclasses.replace(settings, **unknown)
    result = run_federation(settings)
    assert [r.status for r in result.records] == ["ok", "ok"], result.records
    for r in result.records:
        held = next(int(n.split("holds ")[1].split(" ")[0]) for n in r.notes if "of the fished class 1" in n)
        assert r.attack == "class-fishing" and held > 0 and r.certified == held
        assert r.scores is not None and r.scores.recovered == held and r.scores.false_certificates == 0


def test_cli_rejects_unknown_threat(tmp_path, capsys):
    from fedleak.cli import main

    assert main(["federate", "--threat", "psychic", "--out", str(tmp_path)]) == 2
    assert "unknown threat 'psychic'" in capsys.readouterr().err


def test_unset_held_out_sizes_fit_the_data():
    """Left unset, the server's test and public sets are a fifth of the data each, at most 1000: digits (1,797
    samples) and LFW (400) federate with the defaults (both were refused for 1000 + 1000); set sizes that do not
    fit say what unset ones would do."""
    from fedleak.federation.settings import data_split

    for name, n, held in (("digits", 1797, 359), ("lfw", 400, 80), ("fashion-mnist", 10000, 1000)):
        split = data_split(name, None, None)
        assert (len(split.test_y), len(split.public_x), len(split.train_y)) == (held, held, n - 2 * held)
    assert len(data_split("digits", 100, 0).test_y) == 100
    with pytest.raises(fedleak.FedleakError, match=r"digits has 1797 samples: too few for test_size=1000, "
                                                   r"public_size=1000 \(left unset, each is a fifth"):
        data_split("digits", 1000, 1000)
