"""``fedleak evaluate``: defenses x attacks on one data set and model, with the utility and cost each takes."""

from __future__ import annotations

from pathlib import Path

import typer

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
    QUIET_HELP,
    WEIGHT_DECAY_HELP,
    WIDTHS_HELP,
    app,
    default_out,
    float_list,
    int_list,
    progress_bar,
)
from fedleak.validation import check_output_dir, check_seed

DEFENSE_HELP = ("A defense setting to evaluate (repeatable): a name stands for each strength it lists; "
                "name:key=value,... for one setting; '+' combines defenses. See 'fedleak info'. "
                "Default: a small grid.")


@app.command()
def evaluate(
    data: str = typer.Option("fashion-mnist-train", help=DATA_HELP + " The clients' training data."),
    test_data: str = typer.Option("auto", help="Test data for utility ('none': hold out the end of --data; "
                                               "'auto': fashion-mnist for fashion-mnist-train, else 'none')."),
    test_size: int = typer.Option(None, min=1, help="Test samples used for utility (default: a fifth of --data "
                                  "when held out of it, else all of --test-data; at most 2000)."),
    client_mode: str = typer.Option("train", help=CLIENT_MODE_HELP),
    widths: str = typer.Option("256", help=WIDTHS_HELP),
    conv: str = typer.Option(None, help="Evaluate a CNN: conv channels, e.g. 6,32, then an FC head of --widths."),
    model: str = typer.Option(None, help=MODEL_HELP),
    defense: list[str] = typer.Option(None, help=DEFENSE_HELP),
    attack: list[str] = typer.Option(None, help="An attack to run (repeatable; default exclusivity and ig)."),
    attack_batch: int = typer.Option(4, min=1, help="Samples per attacked batch."),
    trials: int = typer.Option(2, min=1, help="Attacked batches per defense setting."),
    iterations: int = typer.Option(200, min=1, help="Iterations of the optimisation attacks."),
    rounds: int = typer.Option(30, min=1, help="Federated training rounds for utility."),
    clients: int = typer.Option(4, min=1, help="Clients in the training federation."),
    client_size: int = typer.Option(None, min=1, help="Training samples per client (default: an equal share of "
                                    "the training data, at most 500)."),
    batch_size: int = typer.Option(32, min=1, help="Samples per client step."),
    lr: float = typer.Option(0.1, help="The clients' learning rate."),
    local_steps: int = typer.Option(1, min=1, help="Local steps per client and round, each on a fresh batch (1: "
                                                   "FedSGD; more: FedAvg); an attacked client takes as many of "
                                                   "--attack-batch samples each."),
    optimizer: str = typer.Option("sgd", help=OPTIMIZER_HELP),
    momentum: float = typer.Option(0.0, help=MOMENTUM_HELP),
    weight_decay: float = typer.Option(0.0, help=WEIGHT_DECAY_HELP),
    upload: str = typer.Option("auto", help="What the attacked server reads of a client's round: delta (one step's "
                                            "change, read as its gradient) | weights (the FedAvg reply: weights "
                                            "before and after) | auto (delta for one local step, else weights)."),
    lr_unknown: bool = typer.Option(False, "--lr-unknown", help=LR_UNKNOWN_HELP),
    label_smoothing: float = typer.Option(0.0, help=LABEL_SMOOTHING_HELP),
    class_weights: str = typer.Option(None, help=CLASS_WEIGHTS_HELP),
    focal_gamma: float = typer.Option(0.0, help=FOCAL_GAMMA_HELP),
    seed: int = typer.Option(0, help="Seed of the model, the partitions, the batches and the defenses' noise."),
    out: Path = typer.Option(default_out("evaluate"), help=OUT_HELP + " Finished cells are kept in cells.jsonl: "
                                                          "run again with the same settings to resume."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Evaluate defenses against attacks: leakage, utility after federated training, client cost and ε."""
    from fedleak.evaluation import DEFAULT_ATTACKS, DEFAULT_DEFENSES, EvaluationSettings, evaluate, write_evaluation
    from fedleak.evaluation.report import OUTPUT_FILES

    settings = EvaluationSettings(
        data=data, test_data=None if test_data == "none" else test_data, test_size=test_size, model=model,
        client_mode=client_mode,
        widths=int_list(widths, "--widths", MAX_WIDTH), conv=int_list(conv, "--conv", MAX_WIDTH) if conv else (),
        defenses=tuple(defense) if defense else DEFAULT_DEFENSES, attacks=tuple(attack) if attack else DEFAULT_ATTACKS,
        attack_batch=attack_batch, trials=trials, attack_iterations=iterations, rounds=rounds, clients=clients,
        client_size=client_size, batch_size=batch_size, lr=lr, local_steps=local_steps, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, upload=upload, lr_known=not lr_unknown,
        seed=check_seed("--seed", seed),
        label_smoothing=label_smoothing, focal_gamma=focal_gamma,
        class_weights=None if class_weights is None else float_list(class_weights, "--class-weights"),
    )
    check_output_dir(out, OUTPUT_FILES)
    grid = settings.grid()
    progress = progress_bar(quiet, 2 * len(grid), "evaluating", "cell")
    result = evaluate(settings, out=out, progress=progress)
    write_evaluation(result, out)
    from fedleak.report.render import number, percent

    typer.echo(f"{'defense':<40}{'leaked':>8}{'exact':>7}{'accuracy':>10}{'time x':>8}{'bytes x':>9}{'eps':>10}")
    for r in result.rows:
        d = r.to_dict()
        eps = f"{d['epsilon']:.3g}" if d["epsilon"] is not None else ""
        typer.echo(f"{r.defense[:39]:<40}{percent(d['leaked_fraction']):>8}{percent(d['recovered_fraction']):>7}"
                   f"{percent(d['accuracy']):>10}{number(d['time_ratio'], 1):>8}{number(d['bytes_ratio'], 2):>9}"
                   f"{eps:>10}")
    for line in result.problems():
        typer.echo(f"note: {line}")
    if result.resumed:
        typer.echo(f"resumed: {result.resumed} finished cell(s) reused from {out / 'cells.jsonl'}")
    typer.echo(f"wrote {out / 'results.json'} and {out / 'report.html'}")
