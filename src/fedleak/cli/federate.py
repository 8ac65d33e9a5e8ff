"""``fedleak federate``: run an audited federation on Flower's simulation engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from click.core import ParameterSource

from fedleak.cli.app import DATA_HELP, MAX_WIDTH, OUT_HELP, WIDTHS_HELP, app, default_out, int_list, is_verbose
from fedleak.defenses.registry import defense_names
from fedleak.errors import FedleakError
from fedleak.validation import check_output_dir, check_seed

OUTPUTS = ("results.json", "report.html")
DEFENSE_HELP = ("A defense every client runs: NAME or NAME:key=value,... (e.g. top-k:ratio=0.1); repeat it, or join "
                f"specs with '+', to combine; default none. Defenses: {', '.join(defense_names())} ('fedleak info' "
                "says what each does); Flower's own DP defenses run as Flower's mods and strategy wrapper "
                "(clients then upload weights).")


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
    ctx: typer.Context,
    data: str = typer.Option("fashion-mnist", help=DATA_HELP),
    clients: int = typer.Option(4, help="Number of simulated clients (Flower supernodes)."),
    rounds: int = typer.Option(2, help="Federated rounds."),
    threat: str = typer.Option("honest", help="The server: honest | fishing | trap-weights | imprint."),
    defense: list[str] = typer.Option(None, "--defense", help=DEFENSE_HELP),
    seed: int = typer.Option(0, help="Seed of the model initialisation, the partitions, the batch draws and the "
                                     "malicious weights."),
    batch_size: int = typer.Option(16, help="Clients' local batch size."),
    local_steps: int = typer.Option(1, help="Local SGD steps per round (1: the exact attacks apply)."),
    local_epochs: int = typer.Option(0, help="Local epochs over the partition (0: use --local-steps)."),
    lr: float = typer.Option(0.1, help="Clients' SGD learning rate (the server's attack does not know it)."),
    widths: str = typer.Option("1000", help=WIDTHS_HELP),
    hidden: str = typer.Option(None, hidden=True, help="Old name of --widths."),
    partition: str = typer.Option("iid", help="How the data is split among clients: iid | label-skew."),
    alpha: float = typer.Option(0.5, help="Dirichlet alpha of the label-skew partition."),
    trap_scale: float = typer.Option(0.8, help="Trap weights' positive/negative magnitude ratio."),
    imprint_bins: int = typer.Option(0, help="Imprint bins (0: the whole first layer)."),
    transform_options: str = typer.Option(None, help="JSON options of the fishing transform (--threat fishing)."),
    no_audit: bool = typer.Option(False, "--no-audit", help="Run the federation without attacking the updates."),
    upload: str = typer.Option("delta", help="What clients send: delta (their change, FedSGD-style) | weights "
                                             "(FedAvg)."),
    audit_mode: str = typer.Option("process", help="Where the attacks run: process (a worker process) | thread | "
                                                   "sync (inside the round)."),
    ray_cpus: int = typer.Option(1, help="CPUs Ray may use."),
    attack_budget: float = typer.Option(30.0, help="Seconds per update for the optimisation attack that audits "
                                                   "multi-step updates (--local-steps > 1 or --local-epochs)."),
    out: Path = typer.Option(default_out("federate"), help=OUT_HELP),
    verbose: bool = typer.Option(False, "--verbose", hidden=True, help="The same as 'fedleak --verbose federate'."),
) -> None:
    """Run a federation on Flower's simulation engine and audit every client update.

    Writes OUT/results.json (one record per round and client: recovered fraction, PSNR, label accuracy,
    attack time, next to the global model's test accuracy; the clients' defenses with their (epsilon, delta))
    and OUT/report.html.
    """
    from fedleak.federation.settings import FederationSettings

    loud = is_verbose(alias=verbose)
    if hidden is not None:  # the old name of --widths
        if ctx.get_parameter_source("widths") is not ParameterSource.DEFAULT:
            raise FedleakError("--hidden is the old name of --widths: give --widths only")
        if loud:
            typer.echo("fedleak: --hidden is deprecated; use --widths", err=True)
        widths = hidden
    sizes = int_list(widths, "--widths", MAX_WIDTH)
    settings = FederationSettings(
        data=data, clients=clients, rounds=rounds, threat=threat, defenses=tuple(defense or ()),
        seed=check_seed("--seed", seed),
        batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs, lr=lr, hidden=sizes,
        partition=partition, alpha=alpha, audit=not no_audit, audit_mode=audit_mode, upload=upload,
        trap_scale=trap_scale, imprint_bins=imprint_bins, transform_options=_parse_options(transform_options), ray_cpus=ray_cpus, client_cpus=min(1.0, float(ray_cpus)),
        attack_budget=attack_budget,
    )
    from fedleak.federation.hooks import get_threat
    from fedleak.federation.partition import PARTITIONS

    get_threat(threat)
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
        result = run_federation(settings, verbose=loud, on_finding=progress)
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
