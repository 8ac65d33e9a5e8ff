"""Your ServerApp: FedAvg on your model. ONE line switches fedleak's audit on (marked below)."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg  # noqa: F401 - the strategy without the audit

from auditapp.task import Net, run_config
from fedleak.federation.strategy import AuditFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    model = Net().eval()
    nodes = int(cfg["min-nodes"])
    # strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes)
    strategy = AuditFedAvg(model, min_available_nodes=nodes, fraction_evaluate=0.0)  # <- the audit: this line
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["lr"])}))  # the audit reads the rate it sends
    if isinstance(strategy, AuditFedAvg):
        findings = [f.to_dict() for f in strategy.findings()]  # waits for the background attacks
        strategy.close()
        for f in findings:
            print(f"round {f['round']} node {f['client_label']}: {f['status']}, {f['rebuilt']} rebuilt, "
                  f"{f['certified']} certified ({f['update_kind']})")
        out = Path(str(cfg["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "findings.json").write_text(json.dumps(findings, indent=1))
        print(f"fedleak: wrote {(out / 'findings.json').resolve()}")
