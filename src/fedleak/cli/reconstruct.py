"""``fedleak reconstruct``: rebuild a batch from a captured update and a model file."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import typer

from fedleak.cli.app import app
from fedleak.errors import FedleakError
from fedleak.validation import check_output_dir, check_seed, check_shape

OUTPUTS = ("reconstruction.npz", "results.json", "report.html")


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise FedleakError(f"--input-shape must be comma-separated whole numbers, got '{text}'") from None
    return check_shape("--input-shape", values, error=FedleakError)


@app.command("reconstruct")
def reconstruct_command(
    model: Path = typer.Option(..., help="Model weights: a safetensors or .pt state dict of a Sequential MLP."),
    update: Path = typer.Option(..., help="The captured client update (.safetensors from fedleak, or a .pt dict)."),
    attack: str = typer.Option("exclusivity", help="Attack to run (see 'fedleak info')."),
    input_shape: str = typer.Option(None, help="Shape of one input, e.g. 1,28,28 (default: from the model file)."),
    seed: int = typer.Option(0, help="Seed for attacks that draw random numbers."),
    out: Path = typer.Option(Path("fedleak-reconstruction"), help="Folder for the outputs."),
) -> None:
    """Rebuild what a client's update reveals: reconstruction.npz, results.json and report.html."""
    import torch

    import fedleak
    from fedleak.report import environment_info, write_atomic, write_json
    from fedleak.report.figures import image_rows_uri
    from fedleak.report.output import staged_output, write_bytes_atomic

    check_output_dir(out, OUTPUTS)  # fail early; the folder is created only when the outputs are written
    torch.manual_seed(check_seed("--seed", seed))
    net = fedleak.load_mlp(model, _shape(input_shape))
    captured = fedleak.load_update(update)
    rec = fedleak.reconstruct(net, captured, attack=attack)
    x = rec.inputs.detach().numpy()
    payload = {
        "kind": "fedleak-reconstruction",
        "seed": seed,
        "settings": {"model": str(model), "update": str(update), "attack": attack, "input_shape": list(net.input_shape)},
        "environment": environment_info(),
        "summary": {"rebuilt": len(rec), "certified": rec.num_certified, "inferred_batch_size": rec.batch_size,
                    "batch_certified": rec.batch_certified, "label_counts": rec.label_counts, "seconds": rec.seconds,
                    "notes": list(rec.notes)},
        "samples": [s.__dict__ for s in rec.samples],
    }
    # render everything before writing anything
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fedleak reconstruction</title></head>"
             "<body style='font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto'>",
             f"<h1>What this update reveals</h1><p>{html.escape(rec.summary())}</p>"]
    if len(rec) and len(net.input_shape) in (2, 3):
        imgs = x.reshape(len(rec), *((1,) + net.input_shape if len(net.input_shape) == 2 else net.input_shape))
        titles = [f"y={int(label)}" for label in rec.labels]
        for start in range(0, len(rec), 16):
            sl = slice(start, start + 16)
            parts.append(f"<img src='{image_rows_uri([('rebuilt', imgs[sl])], rec.certified.numpy()[sl], titles[sl])}'>")
        parts.append("<p>Green frame: certified (the sample's recomputed gradient explains the observed one); "
                     "red: not certified.</p>")
    parts.append("<p>Details per sample are in results.json.</p></body></html>")
    page = "\n".join(parts)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, x=x, y=rec.labels.numpy(), certified=rec.certified.numpy())
    with staged_output(out, OUTPUTS) as stage:  # all three files or none
        write_bytes_atomic(stage / "reconstruction.npz", buf.getvalue())
        write_atomic(stage / "report.html", page)
        write_json(stage / "results.json", payload)
    typer.echo(rec.summary())
    typer.echo(f"wrote {out / 'reconstruction.npz'}, {out / 'results.json'} and {out / 'report.html'}")
