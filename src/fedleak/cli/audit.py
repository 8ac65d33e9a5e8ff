"""``fedleak audit`` and ``fedleak demo``: run a leakage audit and write results.json + report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from fedleak.cli.app import (
    CLASS_WEIGHTS_HELP,
    CLIENT_MODE_HELP,
    DATA_HELP,
    FOCAL_GAMMA_HELP,
    LABEL_SMOOTHING_HELP,
    MAX_WIDTH,
    MODEL_HELP,
    OUT_HELP,
    QUIET_HELP,
    WEIGHTS_HELP,
    WIDTHS_HELP,
    app,
    default_out,
    float_list,
    int_list,
    progress_bar,
)
from fedleak.defenses.registry import defense_names
from fedleak.errors import FedleakError
from fedleak.membership.catalog import CHEAP_ATTACKS
from fedleak.validation import check_output_dir, check_seed

DEFENSE_HELP = ("Also audit clients running a defense: NAME or NAME:key=value,... (e.g. top-k:ratio=0.1; '+' combines "
                "several into one client); repeatable, each one scenario named by its label. Defenses: "
                f"{', '.join(defense_names())} ('fedleak info' says what each does).")


def _print_summary(result, out_dir: Path) -> None:
    """The audit's table on the console, in the report's number formats ("<1%", blank PSNR when nothing was
    matched): "recovered" is certified and exact, "exact" within the exactness tolerance, certified or not (what a
    defense that withholds certificates still leaks); batches a defense withheld show how many samples were sent;
    then each defense's privacy."""
    from fedleak.report.render import percent, psnr_text

    sent_by_row: dict[tuple[str, int], int] = {}
    for b in result.batches:
        key = (b.scenario, b.batch_size)
        sent_by_row[key] = sent_by_row.get(key, 0) + (b.batch_size if b.sent is None else b.sent)
    rows = result.summary_rows()
    width = max([10] + [len(str(r["scenario"])) + 2 for r in rows])
    typer.echo(f"{'scenario':<{width}}{'batch':>6}{'sent':>9}{'certifiable':>13}{'recovered':>11}{'exact':>7}"
               f"{'false cert':>11}{'PSNR dB':>9}{'attack ms':>11}")
    for r in rows:
        sent = sent_by_row[(r["scenario"], r["batch_size"])]
        total = r["batch_size"] * r["trials"]
        psnr = psnr_text(r["mean_psnr"], sent) or "–"
        sent_of = f"{sent}/{total}"
        certifiable = percent(r["certifiable_fraction"]) or "n/a"  # None: the model was not analysed
        typer.echo(f"{r['scenario']:<{width}}{r['batch_size']:>6}{sent_of:>9}{certifiable:>13}"
                   f"{percent(r['recovered_fraction']):>11}{percent(r['exact_fraction']):>7}"
                   f"{r['false_certificates']:>11}{psnr:>9}"
                   f"{r['attack_ms']:>11.1f}")
    for line in _privacy_lines(result):
        typer.echo(line)
    typer.echo(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.html'}")


def _privacy_lines(result) -> list[str]:
    """Per defense scenario: its (epsilon, delta) for one FedSGD update at each batch size, or that it has none."""
    lines = []
    for scenario in result.settings.scenario_names[len(result.settings.scenarios):]:
        rows = [r for r in result.summary_rows() if r["scenario"] == scenario]
        guarantees = [(r["batch_size"], p) for r in rows for p in r["privacy"]]
        if not guarantees:
            lines.append(f"{scenario}: no formal privacy guarantee")
            continue
        lines.append(f"{scenario}: " + "; ".join(
            f"epsilon {p['epsilon']:.3g} at delta {p['delta']:.3g} per {p['unit']} (batch {size}, {p['accountant']})"
            for size, p in guarantees))
    return lines


def _run(settings, out: Path, quiet: bool) -> None:
    from fedleak.audit import run_audit, write_audit
    from fedleak.audit.report import OUTPUT_FILES

    check_output_dir(out, OUTPUT_FILES)  # fail early on an unusable output folder; it is created only when writing
    total = len(settings.scenario_names) * len(settings.batch_sizes) * settings.trials
    result = run_audit(settings, progress=progress_bar(quiet, total, f"auditing {settings.data}", "batch"))
    write_audit(result, out)  # both files or neither
    _print_summary(result, out)
    sizes = result.reconstructable_batch_size()
    typer.echo("largest batch size with >= 99% recovered: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    for note in result.notes:
        typer.echo(f"note: {note}")


MEMBERSHIP_HELP = ("Audit membership inference instead of reconstruction: train the target (an MLP of --widths, or "
                   "--model, starting from --weights if given) on --members records of --data, hold out "
                   "--non-members, and score each --membership-attacks attack (AUC, TPR at 1% FPR); each --defense "
                   "is applied to the target's training (DP-SGD reports epsilon). --batch-sizes, --trials, --attack, "
                   "--bias and --budget are not used.")
MEMBERSHIP_ATTACKS_HELP = ("--membership: membership attacks, comma-separated ('fedleak info' lists them), each NAME "
                           "or NAME:key=value,... (e.g. loss,augmented-loss:padding=4,flip=false); default: "
                           f"{', '.join(CHEAP_ATTACKS)}, which train no shadow model. whitebox "
                           "and lira train shadow models on --reference records (minutes on a CPU): named only.")


def _attack_specs(text: str) -> tuple[str, ...]:
    """``--membership-attacks`` as specs: an item with ``=`` and no ``:`` is one more option of the attack before it
    (``augmented-loss:padding=4,flip=false`` is one attack)."""
    specs: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return tuple(specs)


def _run_membership(settings, out: Path) -> None:
    from fedleak.audit.membership import run_membership_audit
    from fedleak.report.membership import OUTPUT_FILES, privacy_text, write_membership_audit

    check_output_dir(out, OUTPUT_FILES)
    audit = run_membership_audit(settings)
    write_membership_audit(audit, out)  # both files or neither
    for scenario in audit.scenarios:
        r = scenario.result
        typer.echo(f"{scenario.name}: train accuracy {r.train_accuracy:.3f}, test accuracy {r.test_accuracy:.3f}, "
                   f"gap {scenario.accuracy_gap:.3f}; {privacy_text(scenario)}")
        width = max([22, *(len(o.name) for o in r.outcomes)])
        for o in r.outcomes:
            typer.echo(f"  {o.name:<{width}} AUC {o.metrics.auc:.3f}  TPR@1%FPR {o.metrics.tpr_at_1pct_fpr:.3f}")
    typer.echo(f"wrote {out / 'results.json'} and {out / 'report.html'}")


@app.command()
def audit(
    data: str = typer.Option("digits", help=DATA_HELP),
    widths: str = typer.Option("1024", help=WIDTHS_HELP),
    conv: str = typer.Option(None, help="Audit a CNN: conv channels, e.g. 6,32 (3x3 convs + ReLU), then an FC "
                                        "head of --widths."),
    batch_sizes: str = typer.Option("1,2,4,8,16,32,64", help="Batch sizes to audit, comma-separated."),
    trials: int = typer.Option(1, min=1, help="Batches drawn per batch size."),
    seed: int = typer.Option(0, help="Seed of the model initialisation and the batch draws."),
    attack: str = typer.Option("exclusivity", help="Attack to run (see 'fedleak info')."),
    bias: bool = typer.Option(True, help="Give the model's layers biases."),
    fishing: bool = typer.Option(False, help="Also audit fished batches (the curious server's LP client hook)."),
    defense: list[str] = typer.Option(None, "--defense", help=DEFENSE_HELP),
    split: str = typer.Option(None, help="Split of a CIFAR or IDX folder given as --data: train or test."),
    model: str = typer.Option(None, help=MODEL_HELP + " Audited instead of a fresh model; --widths, --conv and "
                                          "--bias are then ignored."),
    weights: Path = typer.Option(None, help=WEIGHTS_HELP),
    budget: float = typer.Option(20.0, help="Seconds per batch for --attack auto."),
    membership: bool = typer.Option(False, help=MEMBERSHIP_HELP),
    membership_attacks: str = typer.Option(None, help=MEMBERSHIP_ATTACKS_HELP),
    members: int = typer.Option(500, help="--membership: records the target trains on."),
    non_members: int = typer.Option(500, help="--membership: held-out records scored against the members."),
    reference: int = typer.Option(None, help="--membership: the attacker's own records for shadow models "
                                             "(default: as many as --members when an attack trains shadows)."),
    epochs: int = typer.Option(30, help="--membership: epochs of SGD that train the target."),
    lr: float = typer.Option(0.1, help="--membership: the target's SGD learning rate."),
    train_batch: int = typer.Option(50, help="--membership: the target's mini-batch size."),
    out: Path = typer.Option(default_out("audit"), help=OUT_HELP),
    client_mode: str = typer.Option("train", help=CLIENT_MODE_HELP),
    label_smoothing: float = typer.Option(0.0, help=LABEL_SMOOTHING_HELP),
    class_weights: str = typer.Option(None, help=CLASS_WEIGHTS_HELP),
    focal_gamma: float = typer.Option(0.0, help=FOCAL_GAMMA_HELP),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Audit how much of each batch an attack rebuilds from the client's FedSGD gradient (and through each
    client defense given with --defense); with --membership, how well membership attacks tell the target's
    training records from held-out ones."""
    from fedleak.audit import AuditSettings

    if membership:
        if conv or fishing or split:
            raise FedleakError("--membership trains an MLP (--widths) or --model; drop --conv, --fishing and --split")
        from fedleak.audit.membership import MembershipAuditSettings

        chosen = {} if membership_attacks is None else {"attacks": _attack_specs(membership_attacks)}
        _run_membership(MembershipAuditSettings(**chosen,
            data=data, model=model, weights=None if weights is None else str(weights),
            widths=int_list(widths, "--widths", MAX_WIDTH), members=members, non_members=non_members,
            reference=reference, epochs=epochs, lr=lr, batch_size=train_batch, defenses=tuple(defense or ()),
            seed=check_seed("--seed", seed)), out)
        return

    settings = AuditSettings(
        data=data, widths=int_list(widths, "--widths", MAX_WIDTH), bias=bias,
        batch_sizes=int_list(batch_sizes, "--batch-sizes"), trials=trials, seed=check_seed("--seed", seed),
        attack=attack, split=split,
        scenarios=("plain",) + (("fished",) if fishing else ()), defenses=tuple(defense or ()),
        model=model, weights=None if weights is None else str(weights), budget=budget,
        conv=int_list(conv, "--conv", MAX_WIDTH) if conv else (), client_mode=client_mode,
        label_smoothing=label_smoothing, focal_gamma=focal_gamma,
        class_weights=None if class_weights is None else float_list(class_weights, "--class-weights"),
    )
    _run(settings, out, quiet)


@app.command()
def demo(
    out: Path = typer.Option(default_out("demo"), help=OUT_HELP),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Audit the embedded default: sklearn digits, a 1024-wide ReLU net, batches of 1 to 128, an honest and a
    fishing server, and a client with exclusivity reduction."""
    from fedleak.audit import AuditSettings

    settings = AuditSettings(data="digits", widths=(1024,), batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128), trials=2,
                             seed=0, scenarios=("plain", "fished"), defenses=("exclusivity-reduction",))
    _run(settings, out, quiet)
