"""Scale: Flower's client sampling, a pool of audit workers, the audit's backlog bound, joining a Ray cluster."""

import json
import multiprocessing

import pytest

from fedleak.errors import FedleakError
from fedleak.federation import FederationSettings
from fedleak.federation.audit_pool import choose_audited

pytest.importorskip("flwr")
pytest.importorskip("ray")


def test_choose_audited_is_seeded_bounded_and_independent_of_arrival_order():
    keys = [(p, 1000 + p) for p in range(10)]
    assert choose_audited(keys, backlog=0, bound=None, seed=0, server_round=1) == tuple(range(10))
    assert choose_audited(keys, backlog=2, bound=12, seed=0, server_round=1) == tuple(range(10))  # fits exactly
    picked = choose_audited(keys, backlog=5, bound=9, seed=3, server_round=2)
    assert len(picked) == 4 and len(set(picked)) == 4
    shuffled = keys[::-1]  # the same updates arriving in another order: the same ones are audited
    assert {shuffled[i] for i in choose_audited(shuffled, 5, 9, 3, 2)} == {keys[i] for i in picked}
    assert choose_audited(keys, backlog=9, bound=9, seed=3, server_round=2) == ()  # no room at all
    draws = {tuple(keys[i] for i in choose_audited(keys, 5, 9, 3, r)) for r in range(1, 6)}
    assert len(draws) > 1  # a new draw each round


def test_scale_options_are_checked(tmp_path, capsys):
    from fedleak.cli import main

    for bad, word in [({"fraction_train": 0.0}, "fraction_train"), ({"fraction_train": 1.5}, "fraction_train"),
                      ({"min_train_nodes": 5}, "min_train_nodes"), ({"audit_workers": 0}, "audit_workers"),
                      ({"audit_backlog": -1}, "audit_backlog"),
                      ({"audit_workers": 2, "audit_mode": "thread"}, "audit_workers")]:
        with pytest.raises(FedleakError, match=word):
            FederationSettings(clients=4, **bad)
    s = FederationSettings(clients=4, fraction_train=0.5, audit_workers=3, audit_backlog=0, ray_address="auto")
    assert FederationSettings.from_json(s.to_json()) == s
    assert main(["federate", "--audit-workers", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "audit_workers" in err[0]


def _jobs(settings, folder):
    """Real client updates of two rounds (local_update: torch autograd), their true batches written for the scorer."""
    from fedleak.client_loss import hard_labels
    from fedleak.federation.client import local_update
    from fedleak.federation.ground_truth import TrueBatch, write_true_batch
    from fedleak.federation.settings import data_split, make_model

    split = data_split(settings.data, settings.test_size, settings.public_size)
    sent = {1: make_model(settings, split).state_dict()}
    jobs = []
    for rnd in (1, 2):
        for pid in range(settings.clients):
            model = make_model(settings, split)
            model.load_state_dict(sent[rnd])
            res = local_update(model, settings, pid, rnd)
            write_true_batch(folder, rnd, 100 + pid, TrueBatch(res.inputs, res.original, hard_labels(res.labels), pid))
            state = {k: v.clone() for k, v in sent[rnd].items()}
            jobs.append((rnd, 100 + pid, pid, state, res.delta, res.num_examples))
            sent.setdefault(rnd + 1, res.weights)  # round 2 starts from client 0's weights
    return jobs


def _fingerprint(record):
    s = record.scores
    return (record.round, record.client, record.status, record.attack, record.rebuilt, record.certified,
            record.update_kind, s.recovered if s else None, s.false_certificates if s else None,
            round(s.psnr, 6) if s and s.psnr is not None else None)


def _audit_here(strategy, job, scorer, declared):
    """One job of :func:`_jobs` audited in this process, as the audit worker does it: the sent weights loaded into a
    copy of the template, the update ``sent - delta`` with the uploaded change."""
    import copy

    from fedleak.federation.audit_worker import AuditInput, run_audit
    from fedleak.updates import WeightUpdate

    rnd, node, pid, sent, delta, n = job
    model = copy.deepcopy(strategy.template)
    model.load_state_dict(sent)
    update = WeightUpdate(sent, {k: sent[k] - delta[k] for k in sent}, num_examples=n)
    return run_audit(strategy.plan, AuditInput(rnd, node, pid, model, update, delta, declared), scorer)


def test_a_pool_of_workers_gives_the_single_worker_results(tmp_path, one_thread):
    """The same jobs through a pool of 2 worker processes and one after another in this process, on one torch
    thread like a worker (what a single worker does with them): the same results, job by job."""
    from fedleak.federation.audit_pool import make_audit_executor
    from fedleak.federation.audit_worker import audit_reply
    from fedleak.federation.ground_truth import GroundTruthScorer
    from fedleak.federation.server_app import build_strategy

    settings = FederationSettings(clients=3, rounds=2, batch_size=8, hidden=(256,), seed=2)
    jobs = _jobs(settings, tmp_path)
    _, strategy = build_strategy(settings)
    scorer = GroundTruthScorer(tmp_path)
    args = [(strategy.plan, rnd, node, pid, sent, None, n, scorer, delta, settings.declared_training())
            for rnd, node, pid, sent, delta, n in jobs]
    results = {}
    before = set(multiprocessing.active_children())  # e.g. a solver's worker another test started in this process
    pool = make_audit_executor("process", 2, strategy.template)
    try:
        futures = [pool.submit(audit_reply, *job) for job in args]
        results[2] = [_fingerprint(f.result(timeout=300)) for f in futures]
        assert len(set(multiprocessing.active_children()) - before) == 2  # the pool's worker processes
    finally:
        pool.shutdown(wait=True)
    results[1] = [_fingerprint(_audit_here(strategy, job, scorer, settings.declared_training())) for job in jobs]
    assert results[1] == results[2]
    assert all(r[2] == "ok" and r[8] == 0 for r in results[1])  # attacked and scored; no false certificate
    assert sum(r[7] for r in results[1]) > 0  # the attack certified samples: the comparison is not of empty results
    assert set(multiprocessing.active_children()) <= before


def test_sampled_clients_worker_pool_backlog_bound_and_a_joined_ray_cluster(tmp_path, capsys, ray_cluster):
    """4 clients, half sampled per round, 2 audit workers, a backlog bound of 1, on a Ray cluster of its own process."""
    import ray

    from fedleak.cli import main
    from fedleak.federation.client import local_update
    from fedleak.federation.server_app import build_strategy
    from fedleak.federation.settings import data_split, make_model

    address, head = ray_cluster
    before = set(multiprocessing.active_children())  # e.g. a solver's worker another test started in this process
    out = tmp_path / "run"
    code = main(["federate", "--clients", "4", "--rounds", "2", "--batch-size", "8", "--widths", "256",
                 "--seed", "1", "--fraction-train", "0.5", "--audit-workers", "2", "--audit-backlog", "1",
                 "--ray-address", address, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert head.poll() is None  # the cluster it joined is still up: fedleak only disconnected
    assert not ray.is_initialized() and set(multiprocessing.active_children()) <= before  # no driver, no audit worker

    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["audit_workers"] == 2 and res["settings"]["ray_address"] == address
    records = res["records"]
    for rnd in (1, 2):
        info = res["rounds"][rnd]
        here = [r for r in records if r["round"] == rnd]
        seen = [(r["client"], r["status"], r.get("detail")) for r in here]  # what a failure prints
        assert len(info["sampled"]) == 2 and set(info["sampled"]) <= {0, 1, 2, 3}, (info, seen)  # int(4 x 0.5)
        assert sorted(r["client"] for r in here) == sorted(info["sampled"]), (info, seen)  # one per sampled client
        audited = [r for r in here if r["status"] == "ok"]
        skipped = [r for r in here if r["status"] == "not-audited"]
        assert info["updates_received"] == 2 and info["updates_audited"] == len(audited)
        assert len(audited) + len(skipped) == 2  # nothing dropped silently
        assert info["audit_backlog"] + len(audited) <= 1  # the bound held
        for r in skipped:
            assert "seed 1" in r["detail"] and "not audited" in r["detail"]
    first = res["rounds"][1]
    assert first["audit_backlog"] == 0 and first["updates_audited"] == 1 and first["audit_sample_seed"] == 1
    assert first["audit_lag_seconds"] is not None and first["audit_lag_seconds"] >= 0
    assert "audited 1 of 2 updates" in printed and "2 of 4 clients sampled" in printed
    report = (out / "report.html").read_text()
    assert "Audit sampled" in report and "not-audited" in report  # the report says it too

    # the audited round-1 update, attacked again here in-process, gives the worker pool's result
    settings = FederationSettings(clients=4, rounds=2, batch_size=8, hidden=(256,), seed=1)
    split = data_split(settings.data, settings.test_size, settings.public_size)
    _, strategy = build_strategy(settings)
    (rec,) = [r for r in records if r["round"] == 1 and r["status"] == "ok"]
    model = make_model(settings, split)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    local = local_update(model, settings, rec["client"], 1)
    again = _audit_here(strategy, (1, rec["node_id"], rec["client"], sent, local.delta, local.num_examples), None,
                        settings.declared_training())
    assert (again.rebuilt, again.certified) == (rec["rebuilt"], rec["certified"]) and rec["certified"] > 0
    assert rec["false_certificates"] == 0 and rec["recovered_fraction"] > 0
