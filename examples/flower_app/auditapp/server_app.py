"""The ServerApp: a FedAvg (fedleak's AuditFedAvg) that attacks each client's update every round."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedleak.federation import FederationSettings
from fedleak.federation.client import federation_accounting
from fedleak.federation.client_app import GROUND_TRUTH_KEY, SETTINGS_KEY
from fedleak.federation.ground_truth import GroundTruthScorer
from fedleak.federation.report import write_report, write_results
from fedleak.federation.results import FederationResult, RoundRecord
from fedleak.federation.run import defense_summary, package_versions
from fedleak.federation.server_app import build_strategy, evaluate_global
from fedleak.federation.settings import data_split, make_model

app = ServerApp()


def settings_from(run_config) -> FederationSettings:
    c = dict(run_config)
    return FederationSettings(
        data=str(c.get("data", "fashion-mnist")), clients=int(c.get("clients", 4)),
        rounds=int(c.get("num-server-rounds", 2)), threat=str(c.get("threat", "honest")),
        defenses=tuple(spec for spec in [str(c.get("defense", "none")).strip()] if spec not in ("", "none")),
        batch_size=int(c.get("batch-size", 16)), lr=float(c.get("lr", 0.1)),
        hidden=tuple(int(w) for w in str(c.get("hidden", "1000")).split(",")),
        partition=str(c.get("partition", "iid")), seed=int(c.get("seed", 0)),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = settings_from(context.run_config)
    split = data_split(settings.data, settings.test_size, settings.public_size)
    truth_dir = tempfile.mkdtemp(prefix="fedleak-truth-")  # evaluation-only side channel (same machine)
    strategy, audit = build_strategy(settings, scorer=GroundTruthScorer(truth_dir))
    accuracy: dict[int, tuple[float, float]] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = evaluate_global(make_model(settings, split), split, arrays)
        accuracy[server_round] = (acc, loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    config = ConfigRecord({SETTINGS_KEY: settings.to_json(), GROUND_TRUTH_KEY: truth_dir})
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model(settings, split).state_dict()),
                       num_rounds=settings.rounds, train_config=config, evaluate_fn=evaluate)
        records = audit.findings()  # waits for the attacks still running
        audit.close()
    except BaseException:
        audit.close(force=True)
        raise
    finally:
        shutil.rmtree(truth_dir, ignore_errors=True)
    rounds = tuple(RoundRecord(r, a, l, audit.round_seconds.get(r), 0, 0) for r, (a, l) in sorted(accuracy.items()))
    result = FederationResult(settings.to_dict(), package_versions(), rounds, tuple(records), 0.0,
                              audit.audit_wait_seconds, defense_summary(settings, federation_accounting(settings)))
    out = Path(str(context.run_config.get("out-dir", "fedleak-out")))
    out.mkdir(parents=True, exist_ok=True)
    write_results(result, out / "results.json")
    write_report(result, out / "report.html")
    for rec in records:
        frac = rec.scores.recovered_fraction if rec.scores else float("nan")
        print(f"round {rec.round} client {rec.client}: {rec.status}, recovered {frac:.0%}")
    print(f"fedleak: wrote {out.resolve() / 'results.json'} and report.html")
