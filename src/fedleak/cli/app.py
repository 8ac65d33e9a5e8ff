"""The typer application every sub-command registers itself on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedleak",
    help="Measure, demonstrate and mitigate training-data leakage from federated-learning updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Measure, demonstrate and mitigate training-data leakage from federated-learning updates."""
