"""``fedleak federate``: run an audited federation on Flower's simulation engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from click.core import ParameterSource

from fedleak.cli.app import (
    CLASS_WEIGHTS_HELP,
    CLIENT_MODE_HELP,
    DATA_HELP,
    FOCAL_GAMMA_HELP,
    LABEL_SMOOTHING_HELP,
    LR_UNKNOWN_HELP,
    MAX_WIDTH,
    MODEL_HELP,
    MOMENTUM_HELP,
    OPTIMIZER_HELP,
    OUT_HELP,
    WEIGHT_DECAY_HELP,
    WEIGHTS_HELP,
    WIDTHS_HELP,
    app,
    default_out,
    float_list,
    int_list,
    is_verbose,
)
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


def _count_or_fraction(text: str, option: str) -> int | float:
    """``"3"`` -> 3 (a count), ``"0.5"`` -> 0.5 (a fraction), as Flower's SecAgg+ reads them."""
    try:
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise FedleakError(f"{option} must be a count or a fraction, got '{text}'") from None


@app.command()
def federate(
    ctx: typer.Context,
    data: str = typer.Option("fashion-mnist", help=DATA_HELP),
    clients: int = typer.Option(4, help="Number of simulated clients (Flower supernodes)."),
    rounds: int = typer.Option(2, help="Federated rounds."),
    threat: str = typer.Option("honest", help="The server: honest | fishing | trap-weights | imprint | "
                                              "membership-active."),
    defense: list[str] = typer.Option(None, "--defense", help=DEFENSE_HELP),
    seed: int = typer.Option(0, help="Seed of the model initialisation, the partitions, the batch draws and the "
                                     "malicious weights."),
    batch_size: int = typer.Option(16, help="Clients' local batch size."),
    local_steps: int = typer.Option(1, help="Local SGD steps per round (1: the exact attacks apply)."),
    local_epochs: int = typer.Option(0, help="Local epochs over the partition (0: use --local-steps)."),
    lr: float = typer.Option(0.1, help="Clients' SGD learning rate, which the server sends them and its attack "
                                       "takes (one-step updates read at the gradient's own scale)."),
    optimizer: str = typer.Option("sgd", help=OPTIMIZER_HELP),
    momentum: float = typer.Option(0.0, help=MOMENTUM_HELP),
    weight_decay: float = typer.Option(0.0, help=WEIGHT_DECAY_HELP),
    lr_unknown: bool = typer.Option(False, "--lr-unknown", help=LR_UNKNOWN_HELP),
    widths: str = typer.Option("1000", help=WIDTHS_HELP + " Not with --model."),
    model: str = typer.Option(None, help="The clients' model instead of the MLP of --widths: " + MODEL_HELP),
    weights: Path = typer.Option(None, help="Initial weights of --model (the first round's): " + WEIGHTS_HELP),
    client_mode: str = typer.Option("train", help=CLIENT_MODE_HELP),
    label_smoothing: float = typer.Option(0.0, help=LABEL_SMOOTHING_HELP),
    class_weights: str = typer.Option(None, help=CLASS_WEIGHTS_HELP),
    focal_gamma: float = typer.Option(0.0, help=FOCAL_GAMMA_HELP),
    hidden: str = typer.Option(None, hidden=True, help="Old name of --widths."),
    partition: str = typer.Option("iid", help="How the data is split among clients: iid | label-skew."),
    alpha: float = typer.Option(0.5, help="Dirichlet alpha of the label-skew partition."),
    trap_scale: float = typer.Option(0.8, help="Trap weights' positive/negative magnitude ratio."),
    imprint_bins: int = typer.Option(0, help="Imprint bins (0: the whole first layer)."),
    fished_class: int = typer.Option(0, help="The class the class-fishing server targets (--threat class-fishing)."),
    transform_options: str = typer.Option(None, help="JSON options of the fishing transform (--threat fishing)."),
    no_audit: bool = typer.Option(False, "--no-audit", help="Run the federation without attacking the updates."),
    upload: str = typer.Option("delta", help="What clients send: delta (their change, FedSGD-style) | weights "
                                             "(FedAvg)."),
    audit_mode: str = typer.Option("process", help="Where the attacks run: process (a worker process) | thread | "
                                                   "sync (inside the round)."),
    ray_cpus: int = typer.Option(1, help="CPUs Ray may use."),
    runtime: str = typer.Option("simulation", help="Where the federation runs: simulation (Flower's simulation "
                                                   "engine, Ray) | deployment (a Flower SuperLink and one SuperNode "
                                                   "per client as separate processes on this machine, each node "
                                                   "with its own data folder)."),
    client_cpus: float = typer.Option(None, help="CPUs Ray reserves per client actor (default min(1, --ray-cpus)); "
                                                 "a fraction runs several client actors per CPU."),
    ray_address: str = typer.Option(None, help="Join this Ray cluster (e.g. auto or HOST:PORT) instead of "
                                               "starting a private local Ray."),
    fraction_train: float = typer.Option(1.0, help="Fraction of the clients Flower samples per round."),
    min_train_nodes: int = typer.Option(1, help="Clients sampled per round at least."),
    audit_workers: int = typer.Option(1, help="Audit worker processes (--audit-mode process)."),
    audit_backlog: int = typer.Option(None, help="Most audit jobs left pending; beyond it a seeded sample of a "
                                                 "round's updates is audited and the count printed (default: no "
                                                 "bound)."),
    attack_budget: float = typer.Option(30.0, help="Seconds per update for the optimisation attack that audits "
                                                   "multi-step updates (--local-steps > 1 or --local-epochs)."),
    secagg: bool = typer.Option(False, "--secagg", help="Run Flower's SecAgg+: the server sees only the aggregate of "
                                                        "the clients' uploads, and the audit attacks that (one record "
                                                        "per round)."),
    secagg_shares: str = typer.Option("1.0", help="SecAgg+ num_shares: a count above 2, or a fraction of the "
                                                  "clients per round (1.0: all)."),
    secagg_threshold: str = typer.Option("0.5", help="SecAgg+ reconstruction_threshold: a count of at least 2, or a "
                                                     "fraction of the shares."),
    secagg_clipping_range: float = typer.Option(8.0, help="SecAgg+ clipping_range: uploads are clipped to "
                                                          "[-R, R] before quantization (Flower's default 8)."),
    secagg_quantization_range: int = typer.Option(4194304, help="SecAgg+ quantization_range: levels of the "
                                                                "quantizer (Flower's default 2**22)."),
    secagg_max_weight: float = typer.Option(1000.0, help="SecAgg+ max_weight: a client's weight is num_examples / "
                                                         "max_weight (Flower's default 1000)."),
    secagg_upload_dtype: str = typer.Option("float32", help="The dtype clients upload in: float32 | float64 "
                                                            "(Flower quantizes in it)."),
    membership_targets: int = typer.Option(0, help="Candidate records the server scores every client update on for "
                                                   "membership (half from the clients' partitions, half held out; "
                                                   "0: none; --threat membership-active: 64 unless given)."),
    membership_ascent: float = typer.Option(1.0, help="--threat membership-active: the server's gradient-ascent step "
                                                      "on the candidates."),
    membership_rounds: str = typer.Option(None, help="--threat membership-active: the rounds it tampers with, "
                                                     "comma-separated (default: every round)."),
    membership_target_loss: float = typer.Option(0.0, help="--threat membership-active: > 0 line-searches the step "
                                                           "so the candidates' mean loss rises to this (nats); 0: the "
                                                           "fixed --membership-ascent step."),
    membership_max_drift: float = typer.Option(0.5, help="--threat membership-active: the most the ascent may shift "
                                                         "the model's predictions on the public data (nats)."),
    membership_last_layers: int = typer.Option(0, help="--threat membership-active: ascend on the last N parameter "
                                                       "tensors only (0: every parameter)."),
    test_size: int = typer.Option(None, help="The server's held-out test records (the data set's last ones; "
                                  "default: a fifth of the data, at most 1000)."),
    public_size: int = typer.Option(None, help="The server's public records (before the test set; default: a "
                                    "fifth of the data, at most 1000)."),
    out: Path = typer.Option(default_out("federate"), help=OUT_HELP),
    verbose: bool = typer.Option(False, "--verbose", hidden=True, help="The same as 'fedleak --verbose federate'."),
) -> None:
    """Run a federation on Flower's simulation engine (or its deployment runtime) and audit every client update
    (under --secagg: each round's aggregate).

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
    if model is not None and ctx.get_parameter_source("widths") is not ParameterSource.DEFAULT:
        raise FedleakError("--widths sets the MLP fedleak builds; with --model your model is used: give one of them")
    sizes = int_list(widths, "--widths", MAX_WIDTH)
    settings = FederationSettings(
        data=data, clients=clients, rounds=rounds, threat=threat, defenses=tuple(defense or ()),
        seed=check_seed("--seed", seed),
        batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs, lr=lr, lr_known=not lr_unknown,
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
        hidden=sizes,
        model=model, weights=None if weights is None else str(weights), client_mode=client_mode,
        label_smoothing=label_smoothing, focal_gamma=focal_gamma,
        class_weights=None if class_weights is None else float_list(class_weights, "--class-weights"),
        partition=partition, alpha=alpha, audit=not no_audit, audit_mode=audit_mode, upload=upload,
        trap_scale=trap_scale, imprint_bins=imprint_bins, fished_class=fished_class,
        transform_options=_parse_options(transform_options),
        ray_cpus=ray_cpus,
        client_cpus=min(1.0, float(ray_cpus)) if client_cpus is None else client_cpus,
        attack_budget=attack_budget,
        secagg=secagg, secagg_shares=_count_or_fraction(secagg_shares, "--secagg-shares"),
        secagg_threshold=_count_or_fraction(secagg_threshold, "--secagg-threshold"),
        secagg_clipping_range=secagg_clipping_range, secagg_quantization_range=secagg_quantization_range,
        secagg_max_weight=secagg_max_weight, secagg_upload_dtype=secagg_upload_dtype,
        fraction_train=fraction_train, min_train_nodes=min_train_nodes, audit_workers=audit_workers,
        audit_backlog=audit_backlog, ray_address=ray_address, runtime=runtime,
        membership_targets=membership_targets, membership_ascent=membership_ascent,
        membership_rounds=int_list(membership_rounds, "--membership-rounds") if membership_rounds else (),
        membership_target_loss=membership_target_loss, membership_max_drift=membership_max_drift,
        membership_last_layers=membership_last_layers,
        test_size=test_size, public_size=public_size,
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
        if record.status not in ("ok", "not-audited"):  # not audited: counted per round in the summary
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
