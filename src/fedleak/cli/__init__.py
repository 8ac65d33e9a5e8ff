"""The ``fedleak`` command line: a thin layer over the public API.

Each sub-command lives in its own module of this package and registers itself on :data:`app`.
Errors that come from bad input (:class:`~fedleak.errors.FedleakError`) end the command with a one-line
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from fedleak.errors import FedleakError

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

# sub-commands register themselves on `app` when imported
from fedleak.cli import commands  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedleak`` script."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns the exit code instead of raising
    except FedleakError as exc:
        print(f"fedleak: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        print("fedleak: aborted", file=sys.stderr)
        return 1
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
