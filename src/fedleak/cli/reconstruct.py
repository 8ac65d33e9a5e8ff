"""``fedleak reconstruct``: rebuild a batch from a captured update and a model (a built-in, your class or a file)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedleak.cli.app import (
    LEARNING_RATE_HELP,
    LOCAL_STEPS_HELP,
    MODEL_HELP,
    NUM_EXAMPLES_HELP,
    OUT_HELP,
    QUIET_HELP,
    UPDATE_HELP,
    UPDATE_KIND_HELP,
    WEIGHTS_HELP,
    app,
    default_out,
    float_list,
    int_list,
    shows_progress,
)
from fedleak.cli.words import as_options
from fedleak.errors import FedleakError
from fedleak.validation import check_output_dir, check_seed

OUTPUTS = ("reconstruction.npz", "results.json", "report.html")


@app.command("reconstruct")
def reconstruct_command(
    model: str = typer.Option(..., help=MODEL_HELP),
    weights: Path = typer.Option(None, help=WEIGHTS_HELP),
    update: Path = typer.Option(..., help=UPDATE_HELP),
    update_kind: str = typer.Option("auto", help=UPDATE_KIND_HELP),
    attack: str = typer.Option("auto", help="Attack to run (see 'fedleak info'); auto takes the exact route where it "
                                            "certifies samples, then the best optimisation attack for the rest."),
    budget: float = typer.Option(60.0, help="Seconds auto may spend in all (exact route and optimisation)."),
    input_shape: str = typer.Option(None, help="Shape of one input, e.g. 1,28,28 (default: from the model file)."),
    num_examples: int = typer.Option(None, help=NUM_EXAMPLES_HELP),
    learning_rate: float = typer.Option(None, help=LEARNING_RATE_HELP),
    local_steps: int = typer.Option(None, help=LOCAL_STEPS_HELP),
    loss_reduction: str = typer.Option(None, help="How the client's loss reduces over its batch, for the exact "
                                                   "route: mean (the default, as F.cross_entropy) or sum "
                                                   "(reduction='sum'; the update must then report its number of "
                                                   "examples)."),
    label_smoothing: float = typer.Option(None, help="The client's label smoothing, for the exact and "
                                                     "optimisation attacks: s of F.cross_entropy(..., "
                                                     "label_smoothing=s), in [0, 1) (default: the exact route "
                                                     "reads it off the update with four classes or more, "
                                                     "else 0)."),
    class_weights: str = typer.Option(None, help="The client's class weights, for the exact and "
                                                 "optimisation attacks: w of "
                                                 "F.cross_entropy(..., weight=w), one per class, comma-separated "
                                                 "(e.g. 1,4.5); the exact route then needs the number of "
                                                 "examples the update reports."),
    focal_gamma: float = typer.Option(None, help="The exponent of the client's focal loss, -(1 - p_y)^gamma log p_y, "
                                                 "for the exact and optimisation attacks and trap weights "
                                                 "(default: 0, the cross-entropy; not with --label-smoothing or "
                                                 "--class-weights)."),
    train_dropout: bool = typer.Option(None, "--train-dropout/--eval-dropout",
                                       help="Whether the client ran the model's Dropout in training mode "
                                            "(model.train()), for the exact route: --train-dropout rebuilds what "
                                            "the exclusive rows give, without a certificate; --eval-dropout reads "
                                            "the update in eval mode only (default: eval mode, and where that "
                                            "certifies nothing, the training-mode reading too)."),
    peel: bool = typer.Option(None, "--peel/--no-peel",
                              help="For the exact route: --peel subtracts the certified samples' gradient and reads "
                                   "what is left again, round after round, certifying the samples it leaves exclusive "
                                   "(the default, on MLPs whose update has a known scale and reports its number of "
                                   "examples); --no-peel reads the update once."),
    defense: str = typer.Option(None, help="The client's defenses, for the attacks that take them (exclusivity, auto "
                                           "and the optimisation attacks; 'fedleak info' lists them): NAME or "
                                           "NAME:key=value,... (e.g. clipping:bound=1.0); '+' combines several. "
                                           "Under per-sample clipping of a known bound the exact route still "
                                           "certifies."),
    data_range: str = typer.Option(None, help="The range the client's inputs live on, LOW,HIGH (e.g. -1,1 for images "
                                              "normalised with mean and std 0.5), for the attacks that read it "
                                              "('fedleak info'): the searches keep their inputs in it (default: "
                                              "[0, 1]), the class-fishing proof holds on it."),
    seed: int = typer.Option(0, help="Seed for attacks that draw random numbers (and a model built without "
                                     "--weights)."),
    out: Path = typer.Option(default_out("reconstruct"), help=OUT_HELP + " Also reconstruction.npz."),
    quiet: bool = typer.Option(False, help=QUIET_HELP),
) -> None:
    """Rebuild what a client's update reveals: reconstruction.npz, results.json and report.html."""
    import torch

    import fedleak
    from fedleak.models.zoo import load_model
    from fedleak.report.reconstruction import ReconstructionRun, write_reconstruction

    check_output_dir(out, OUTPUTS)  # fail early; the folder is created only when the outputs are written
    seed = check_seed("--seed", seed)
    torch.manual_seed(seed)
    loaded = load_model(model, weights=weights, seed=seed)
    shape = ((int_list(input_shape, "--input-shape") if input_shape else None) or loaded.input_shape
             or getattr(loaded.module, "input_shape", None))
    options: dict[str, object] = {} if shape is None else {"input_shape": tuple(shape)}
    weighted = float_list(class_weights, "--class-weights") if class_weights is not None else None
    span = float_list(data_range, "--data-range") if data_range is not None else None
    if span is not None and len(span) != 2:
        raise FedleakError(f"--data-range must be two numbers LOW,HIGH, got '{data_range}'")
    # the client's loss, defenses and data range: every route that simulates or recomputes its gradient takes them
    client = {k: v for k, v in (("label_smoothing", label_smoothing), ("class_weights", weighted),
                                ("focal_gamma", focal_gamma), ("defense", defense), ("data_range", span))
              if v is not None}
    exact = {k: v for k, v in (("loss_reduction", loss_reduction), ("train_dropout", train_dropout), ("peel", peel))
             if v is not None}
    if attack == "auto":
        options.update(budget=budget, progress=shows_progress(quiet), seed=seed, exclusivity_options=exact, **client)
    else:
        options.update(exact, **client)
    captured = fedleak.load_update(update, loaded.module, update_kind)
    rec = fedleak.reconstruct(loaded.module, captured, attack=attack, num_examples=num_examples,
                              learning_rate=learning_rate, local_steps=local_steps, **options)
    told = {k: v for k, v in {**options, "num_examples": num_examples, "learning_rate": learning_rate,
                              "local_steps": local_steps}.items()
            if v not in (None, {}) and k not in ("progress", "seed", "input_shape")}
    run = ReconstructionRun(rec, tuple(rec.inputs.shape[1:]), str(model), str(update), attack, seed, told)
    write_reconstruction(run, out)  # all three files or none
    typer.echo(as_options(rec.summary()))
    typer.echo(f"wrote {out / 'reconstruction.npz'}, {out / 'results.json'} and {out / 'report.html'}")
