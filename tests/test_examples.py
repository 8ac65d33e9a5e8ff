"""The example Flower app (examples/flower_app): it imports, and its ServerApp and ClientApp run a federation on
Flower's simulation engine with the audit switched on (the deployment runtime is exercised by
tests/federation/test_deployment.py)."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

APP = Path(__file__).resolve().parent.parent / "examples" / "flower_app"


@pytest.fixture
def example_app(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    yield
    for name in [m for m in sys.modules if m == "auditapp" or m.startswith("auditapp.")]:
        del sys.modules[name]


def test_the_example_app_runs_on_the_simulation_engine(example_app, tmp_path, monkeypatch, ray_cluster):
    from auditapp import client_app, server_app, task
    from flwr.simulation import run_simulation

    from fedleak.federation.run import isolated_environment, shutdown_ray

    assert "AuditFedAvg(" in (APP / "auditapp" / "server_app.py").read_text()  # the one line
    monkeypatch.chdir(tmp_path)  # out-dir is relative: fedleak-out/findings.json
    with isolated_environment():
        try:
            run_simulation(server_app=server_app.app, client_app=client_app.app, num_supernodes=2,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"address": ray_cluster[0]}})
        finally:
            shutdown_ray()
    findings = json.loads((tmp_path / "fedleak-out" / "findings.json").read_text())
    rounds = int(task.run_config(type("C", (), {"run_config": {}})())["num-server-rounds"])
    assert len(findings) == 2 * rounds and {f["round"] for f in findings} == set(range(1, rounds + 1))
    assert len({f["node_id"] for f in findings}) == 2
    for f in findings:  # every update of every round attacked by the exact route (one local step, reported)
        assert f["status"] == "ok" and f["attack"] == "exclusivity" and f["multi_step"] is False
        assert 0 <= f["certified"] <= f["rebuilt"]
        lr = float(task.run_config(type("C", (), {"run_config": {}})())["lr"])
        assert f"at learning rate {lr:g}" in f["update_kind"]  # the rate the server sent in its train config
