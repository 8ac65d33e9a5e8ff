"""Membership inference inside a federation: the active server's gradient ascent and its line search, a paired
round (honest and active server, same federation) scored on real client updates on digits, one real Flower
federation, and bad options."""

from __future__ import annotations

import json

import pytest
import torch

from fedleak.errors import FedleakError
from fedleak.federation.client import local_update
from fedleak.federation.membership import (
    CALIBRATED,
    SCORES,
    ascend_on_targets,
    membership_targets,
    paired_round,
    tamper_for_membership,
)
from fedleak.federation.settings import FederationSettings, data_split, make_model
from fedleak.membership.signals import record_losses

SMALL = dict(data="digits", clients=2, rounds=2, local_epochs=3, hidden=(256,), test_size=300, public_size=100,
             membership_targets=64, audit=False)


def test_targets_mix_each_clients_members_with_held_out_records():
    settings = FederationSettings(**SMALL)
    targets = membership_targets(settings)
    assert len(targets.records) == 64
    assert [int((targets.owner == p).sum()) for p in (-1, 0, 1)] == [32, 16, 16]
    keep, truth = targets.truth(0)
    assert int(keep.sum()) == 48 and int(truth.sum()) == 16


def test_active_ascent_raises_the_candidates_loss_to_the_target():
    settings = FederationSettings(**{**SMALL, "threat": "membership-active", "membership_rounds": (2,)})
    split = data_split(settings.data, settings.test_size, settings.public_size)
    model = make_model(settings, split)
    records = membership_targets(settings).records
    before = record_losses(model, records)
    untouched = tamper_for_membership(model, 1, settings, split)  # round 1 is not attacked
    assert torch.equal(record_losses(untouched, records), before)
    after = record_losses(tamper_for_membership(model, 2, settings, split), records)
    assert float(after.mean()) > float(before.mean()) + 0.05  # a fixed step: the candidates' mean loss went up
    local_update(model, settings, 0, 1)  # a trained model: the public predictions have somewhere to drift from
    before = record_losses(model, records)
    _, ascent = ascend_on_targets(model, records, 0.0, target_loss=3.0, public=split.public_x, max_drift=10.0)
    assert ascent.loss_before == pytest.approx(float(before.mean()))
    assert ascent.step > 0 and ascent.loss_after == pytest.approx(3.0, abs=0.05)  # the line search hit the target
    _, bounded = ascend_on_targets(model, records, 0.0, target_loss=3.0, public=split.public_x, max_drift=0.2)
    assert bounded.step < ascent.step and bounded.public_drift <= 0.2 + 1e-6  # the public bound stops it


def test_paired_round_active_and_passive_scores_beat_chance():
    """The same federation's round 2 run twice (fedleak's client code, without Flower): the honest server's and
    the active server's scores of the clients' updates, on their own members against held-out records."""
    settings = FederationSettings(**{**SMALL, "local_epochs": 10, "test_size": 1200, "public_size": 397,
                                     "membership_targets": 128, "membership_target_loss": 2.5,
                                     "membership_max_drift": 1.0})  # 200 records per client: it memorises
    paired = paired_round(settings, 2)
    assert paired.ascent.loss_after > paired.ascent.loss_before and paired.ascent.public_drift <= 1.0 + 1e-6
    assert 0 < paired.accuracy[1] <= 1 and paired.accuracy[0] > 0.5  # one warm-up round trains the model
    for findings, mode in ((paired.honest, "passive"), (paired.active, "active")):
        assert {(r.round, r.client, r.score) for r in findings} == {(2, c, s) for c in (-1, 0, 1) for s in SCORES}
        assert all(r.mode == mode for r in findings)
        pooled = {r.score: r.metrics for r in findings if r.client == -1}
        assert pooled["loss"].members == 64 and pooled["loss"].non_members == 128
        # chance is 0.5; with 64 members against 128 non-members the AUC's standard error is about 0.045
        assert pooled["loss"].auc > 0.65 and pooled[CALIBRATED].auc > 0.55, (mode, pooled["loss"].auc)


def test_bad_membership_options_name_the_parameter():
    with pytest.raises(FedleakError, match="membership_targets"):
        FederationSettings(**{**SMALL, "membership_targets": 3})
    with pytest.raises(FedleakError, match="membership_rounds"):
        FederationSettings(**{**SMALL, "membership_rounds": (3,)})
    with pytest.raises(FedleakError, match="membership_ascent"):
        FederationSettings(**{**SMALL, "membership_ascent": -1.0})
    with pytest.raises(FedleakError, match="membership_target_loss"):
        FederationSettings(**{**SMALL, "membership_target_loss": -1.0})
    with pytest.raises(FedleakError, match="membership_max_drift"):
        FederationSettings(**{**SMALL, "membership_max_drift": 0.0})
    assert FederationSettings(data="digits", threat="membership-active").membership_targets == 64


def test_federate_cli_bad_membership_option_is_one_line(tmp_path, capsys):
    from fedleak.cli import main

    assert main(["federate", "--data", "digits", "--membership-targets", "3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "membership_targets" in err and len(err.splitlines()) == 1


def test_flower_federation_records_passive_and_active_rounds(tmp_path, ray_cluster):
    """A real Flower federation: round 1 passive, round 2 the server ascends on the candidates."""
    from fedleak.federation.report import write_report, write_results
    from fedleak.federation.run import run_federation

    settings = FederationSettings(**{**SMALL, "local_epochs": 1, "threat": "membership-active",
                                     "membership_rounds": (2,), "membership_targets": 32,
                                     "ray_address": ray_cluster[0]})
    result = run_federation(settings)
    modes = {(r.round, r.mode) for r in result.membership}
    assert modes == {(1, "passive"), (2, "active")}
    per_client = [r for r in result.membership if r.client >= 0]
    assert {(r.round, r.client) for r in per_client} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(r.metrics.members == 8 and r.metrics.non_members == 16 for r in per_client)
    write_results(result, tmp_path / "results.json")
    write_report(result, tmp_path / "report.html")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {m["score"] for m in saved["membership"]} == set(SCORES)
    assert saved["settings"]["membership_rounds"] == [2]
    assert "membership ROC" in (tmp_path / "report.html").read_text()
