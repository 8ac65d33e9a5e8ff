"""``fedleak federate``: run an audited federation on Flower's simulation engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from fedleak.cli.app import app
from fedleak.errors import FedleakError
from fedleak.validation import check_output_dir, check_seed

OUTPUTS = ("results.json", "report.html")


def _parse_options(text: str | None) -> tuple:
    if not text:
        return ()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FedleakError(f"--transform-options must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise FedleakError("--transform-options must be a JSON object, e.g. '{\"targets_last\": 3}'")
    return tuple(value.items())


@app.command()
def federate(
    data: str = typer.Option("fashion-mnist", help="built-in data set or path"),
    clients: int = typer.Option(4, help="number of simulated clients (Flower supernodes)"),
    rounds: int = typer.Option(2, help="federated rounds"),
    threat: str = typer.Option("honest", help="honest | fishing | trap-weights | imprint"),
    defense: str = typer.Option("none", help="none | exclusivity-reduction | weight-noise | sparsification | dp"),
    defense_strength: float = typer.Option(0.0, help="weight-noise std / sparsification dropped fraction / DP noise multiplier"),
    clip_norm: float = typer.Option(1.0, help="DP clipping norm (defense dp)"),
    seed: int = typer.Option(0, help="seed of the model, partitions, batches and malicious weights"),
    batch_size: int = typer.Option(16, help="local batch size"),
    local_steps: int = typer.Option(1, help="local SGD steps per round (1: exact attacks apply)"),
    local_epochs: int = typer.Option(0, help="local epochs over the partition (0: use --local-steps)"),
    lr: float = typer.Option(0.1, help="clients' SGD learning rate (the server's attack does not know it)"),
    hidden: str = typer.Option("1000", help="hidden widths of the MLP, comma-separated"),
    partition: str = typer.Option("iid", help="iid | label-skew"),
    alpha: float = typer.Option(0.5, help="Dirichlet alpha of the label-skew partition"),
    trap_scale: float = typer.Option(0.8, help="trap weights' positive/negative magnitude ratio"),
    imprint_bins: int = typer.Option(0, help="imprint bins (0: the whole first layer)"),
    transform_options: str = typer.Option(None, help="JSON options of the fishing / exclusivity-reduction transform"),
    no_audit: bool = typer.Option(False, "--no-audit", help="run the federation without attacking the updates"),
    upload: str = typer.Option("delta", help="delta (clients send their change, FedSGD-style) | weights (FedAvg)"),
    audit_mode: str = typer.Option("process", help="process (attacks in a worker process) | thread | sync (inside the round)"),
    ray_cpus: int = typer.Option(1, help="CPUs Ray may use"),
    out: Path = typer.Option(..., help="output folder for results.json and report.html"),
    verbose: bool = typer.Option(False, help="show Flower's and Ray's logs"),
) -> None:
    """Run a federation on Flower's simulation engine and audit every client update.

    Writes OUT/results.json (one record per round and client: recovered fraction, PSNR, label accuracy,
    attack time, next to the global model's test accuracy) and OUT/report.html.
    """
    from fedleak.federation.settings import FederationSettings

    try:
        widths = tuple(int(w) for w in hidden.split(",") if w.strip())
    except ValueError:
        raise FedleakError(f"--hidden must be comma-separated integers, got '{hidden}'") from None
    settings = FederationSettings(
        data=data, clients=clients, rounds=rounds, threat=threat, defense=defense, seed=check_seed("--seed", seed),
        batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs, lr=lr, hidden=widths,
        partition=partition, alpha=alpha, audit=not no_audit, audit_mode=audit_mode, upload=upload,
        trap_scale=trap_scale, imprint_bins=imprint_bins, defense_strength=defense_strength, clip_norm=clip_norm,
        transform_options=_parse_options(transform_options), ray_cpus=ray_cpus, client_cpus=min(1.0, float(ray_cpus)),
    )
    from fedleak.federation.hooks import get_defense, get_threat
    from fedleak.federation.partition import PARTITIONS

    get_threat(threat)
    get_defense(defense)
    if partition not in PARTITIONS:
        raise FedleakError(f"unknown partition '{partition}'; use one of {', '.join(PARTITIONS)}")
    check_output_dir(out, OUTPUTS)  # fail early; the folder is created only when the outputs are written

    from fedleak.federation.report import write_report, write_results
    from fedleak.federation.run import run_federation, summarize
    from fedleak.report.output import staged_output

    def progress(record) -> None:
        if record.status != "ok":
            typer.echo(f"round {record.round}, client {record.client}: {record.status}: {record.detail}", err=True)

    try:
        result = run_federation(settings, verbose=verbose, on_finding=progress)
    except KeyboardInterrupt:
        # Ray, Flower's threads, the audit worker and the temp folder are already cleaned up; exit
        # directly (the typer layer would turn the interrupt into a return value and exit code 0)
        typer.echo("fedleak: interrupted; the federation was stopped and its temp files removed", err=True)
        sys.exit(130)
    with staged_output(out, OUTPUTS) as stage:  # both files or neither
        write_results(result, stage / "results.json")
        write_report(result, stage / "report.html")
    for line in summarize(result):
        typer.echo(line)
    typer.echo(f"wrote {out / 'results.json'} and {out / 'report.html'}")
