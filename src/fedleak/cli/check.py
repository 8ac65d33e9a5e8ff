"""``fedleak check``: before any attack, which attacks apply to a model and update, and why (:func:`fedleak.plan`)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedleak.cli.app import (
    DATA_HELP,
    LEARNING_RATE_HELP,
    LOCAL_STEPS_HELP,
    MODEL_HELP,
    NUM_EXAMPLES_HELP,
    UPDATE_HELP,
    UPDATE_KIND_HELP,
    WEIGHTS_HELP,
    app,
    int_list,
)
from fedleak.cli.words import as_options
from fedleak.errors import FedleakError

MAX_BATCH = 1 << 16


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    return int_list(text, "--input-shape")


@app.command("check")
def check_command(
    model: str = typer.Option(..., help=MODEL_HELP),
    weights: Path = typer.Option(None, help=WEIGHTS_HELP),
    update: Path = typer.Option(None, help=UPDATE_HELP + " Its kind and batch size join the plan."),
    update_kind: str = typer.Option("auto", help=UPDATE_KIND_HELP),
    data: str = typer.Option(None, help=DATA_HELP + " The inputs activations are measured on; default: a built-in "
                                        "model's own data set, else synthetic inputs (the plan says so)."),
    batch_size: int = typer.Option(None, help="The batch size your clients train with."),
    num_examples: int = typer.Option(None, help=NUM_EXAMPLES_HELP),
    learning_rate: float = typer.Option(None, help=LEARNING_RATE_HELP),
    local_steps: int = typer.Option(None, help=LOCAL_STEPS_HELP),
    batch_sizes: str = typer.Option(None, help="Batch sizes to judge, comma-separated (default: the update's, else "
                                               "1,8,32); the largest is the one the verdict is for."),
    input_shape: str = typer.Option(None, help="Shape of one input, e.g. 3,32,32 (default: from the data or the "
                                               "model)."),
    proofs: int = typer.Option(None, help="Conv blocks with enough equations: try the attack's proof on this many "
                                          "inputs (default: 4 when it is cheap; 0: never)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the plan as JSON to this file (atomically)."),
    seed: int = typer.Option(0, help="Seed of the model's initialisation (without --weights) and of the draws."),
) -> None:
    """Say which attacks apply to a model and update, and why, before running any."""
    import fedleak
    from fedleak.models.zoo import load_model
    from fedleak.report.output import write_json
    from fedleak.validation import check_output_file, check_seed

    if json_path is not None:
        check_output_file(json_path)  # fail before the work
    seed = check_seed("--seed", seed)
    sizes = list(int_list(batch_sizes, "--batch-sizes", MAX_BATCH)) if batch_sizes else []
    if batch_size is not None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise FedleakError(f"--batch-size must lie in [1, {MAX_BATCH:,}], got {batch_size}")
        sizes.append(batch_size)
    loaded = load_model(model, weights=weights, seed=seed)
    captured = None if update is None else fedleak.load_update(update, loaded.module, update_kind)
    data_name = data or loaded.data
    inputs = None if data_name is None else fedleak.load_dataset(data_name)
    shape = _shape(input_shape) or (None if inputs is not None else loaded.input_shape)
    result = fedleak.plan(loaded.module, captured, inputs, input_shape=shape, batch_sizes=sizes or None,
                          proofs=proofs, name=loaded.name, seed=seed, num_examples=num_examples,
                          learning_rate=learning_rate, local_steps=local_steps)
    typer.echo(as_options(result.to_text()))
    if json_path is not None:
        payload = {"kind": "fedleak-plan", "model": loaded.source, "data": data_name,
                   "update": None if update is None else str(update), "plan": result.to_dict()}
        write_json(json_path, payload)
        typer.echo(f"wrote {json_path}")
