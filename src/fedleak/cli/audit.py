"""``fedleak audit`` and ``fedleak demo``: run a leakage audit and write results.json + report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from fedleak.cli.app import app
from fedleak.errors import FedleakError
from fedleak.validation import check_output_dir, check_seed, parse_int

MAX_WIDTH = 100_000  # neurons per layer (or conv channels) of a model the audit builds


def _ints(text: str, what: str, high: int | None = None) -> tuple[int, ...]:
    """Comma-separated whole numbers in [1, high], e.g. ``--widths 1024,512``."""
    items = [v for v in text.replace(" ", "").split(",") if v]
    if not items:
        raise FedleakError(f"{what} must not be empty")
    for item in items:
        if not item.lstrip("-").isdigit():
            raise FedleakError(f"{what} must be comma-separated whole numbers, got '{text}'")
    return tuple(parse_int(what, item, low=1, high=high) for item in items)


def _progress(quiet: bool, total: int, desc: str):
    if quiet:
        return None
    from tqdm import tqdm

    return lambda it: tqdm(it, total=total, desc=desc, unit="batch", leave=False)


def _print_summary(result, out_dir: Path) -> None:
    typer.echo(f"{'scenario':<10}{'batch':>6}{'certifiable':>13}{'recovered':>11}{'false cert':>11}"
               f"{'PSNR dB':>9}{'attack ms':>11}")
    for r in result.summary_rows():
        psnr = "–" if r["mean_psnr"] is None else f"{r['mean_psnr']:.1f}"
        typer.echo(f"{r['scenario']:<10}{r['batch_size']:>6}{100 * r['certifiable_fraction']:>12.0f}%"
                   f"{100 * r['recovered_fraction']:>10.0f}%{r['false_certificates']:>11}{psnr:>9}"
                   f"{r['attack_ms']:>11.1f}")
    typer.echo(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.html'}")


def _run(settings, out: Path, quiet: bool) -> None:
    from fedleak.audit import run_audit, write_audit
    from fedleak.audit.report import OUTPUT_FILES

    check_output_dir(out, OUTPUT_FILES)  # fail early on an unusable output folder; it is created only when writing
    total = len(settings.scenarios) * len(settings.batch_sizes) * settings.trials
    result = run_audit(settings, progress=_progress(quiet, total, f"auditing {settings.data}"))
    write_audit(result, out)  # both files or neither
    _print_summary(result, out)
    sizes = result.reconstructable_batch_size()
    typer.echo("largest batch size with >= 99% recovered: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


@app.command()
def audit(
    data: str = typer.Option("digits", help="Built-in data set name (see 'fedleak info') or a path to your data."),
    widths: str = typer.Option("1024", help="Hidden layer widths of the fully connected ReLU model, e.g. 1024,512."),
    conv: str = typer.Option(None, help="Audit a CNN: conv channels, e.g. 6,32 (3x3 convs + ReLU), then an FC "
                                        "head of --widths."),
    batch_sizes: str = typer.Option("1,2,4,8,16,32,64", help="Batch sizes to audit, comma-separated."),
    trials: int = typer.Option(1, min=1, help="Batches drawn per batch size."),
    seed: int = typer.Option(0, help="Seed of the model initialisation and the batch draws."),
    attack: str = typer.Option("exclusivity", help="Attack to run (see 'fedleak info')."),
    bias: bool = typer.Option(True, help="Give the model's layers biases."),
    fishing: bool = typer.Option(False, help="Also audit fished batches (the curious server's LP client hook)."),
    defense: bool = typer.Option(False, help="Also audit batches after the client's exclusivity-reduction defense."),
    split: str = typer.Option(None, help="Split of a CIFAR or IDX folder given as --data: train or test."),
    model: Path = typer.Option(None, help="Audit your own model file (state dict of a Sequential MLP) instead of "
                                         "a fresh one; --widths/--bias are then ignored."),
    out: Path = typer.Option(Path("fedleak-audit"), help="Folder for results.json and report.html."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Audit how much of each batch an attack rebuilds from the client's FedSGD gradient."""
    from fedleak.audit import AuditSettings

    settings = AuditSettings(
        data=data, widths=_ints(widths, "--widths", MAX_WIDTH), bias=bias,
        batch_sizes=_ints(batch_sizes, "--batch-sizes"), trials=trials, seed=check_seed("--seed", seed),
        attack=attack, split=split,
        scenarios=("plain",) + (("fished",) if fishing else ()) + (("defended",) if defense else ()),
        model=None if model is None else str(model), conv=_ints(conv, "--conv", MAX_WIDTH) if conv else (),
    )
    _run(settings, out, quiet)


@app.command()
def demo(
    out: Path = typer.Option(Path("fedleak-demo"), help="Folder for results.json and report.html."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Audit the embedded default: sklearn digits, a 1024-wide ReLU net, batches of 1 to 128."""
    from fedleak.audit import AuditSettings, available_scenarios

    scenarios = tuple(s for s in ("plain", "fished", "defended") if s in available_scenarios())
    settings = AuditSettings(data="digits", widths=(1024,), batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128), trials=2,
                             seed=0, scenarios=scenarios)
    _run(settings, out, quiet)
