"""``fedleak info``: versions, built-in data sets and registered attacks."""

from __future__ import annotations

import typer

from fedleak.cli.app import app


@app.command()
def info() -> None:
    """Show fedleak's version, built-in data sets and attacks."""
    import fedleak

    typer.echo(f"fedleak {fedleak.__version__}")
    typer.echo("data sets:")
    for name, desc in fedleak.available_datasets().items():
        typer.echo(f"  {name:<16} {desc}")
    typer.echo("attacks:")
    for name, attack in fedleak.available_attacks().items():
        typer.echo(f"  {name:<16} {attack.description}")
