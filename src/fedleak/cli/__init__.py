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


from fedleak.launch import INTERRUPTED  # noqa: E402


def fail(message: object) -> None:
    """Print ``fedleak: error: <message>`` on one line of stderr."""
    lines = (line.strip() for line in str(message).splitlines())
    print("fedleak: error: " + " ".join(line for line in lines if line), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedleak`` script: bad input ends with one line on stderr and exit code 2, Ctrl-C
    with one line and exit code 130, never a traceback."""
    import click

    try:
        code = app(args=argv, standalone_mode=False)  # click returns the exit code instead of raising
    except FedleakError as exc:
        fail(exc)
        return 2
    except KeyboardInterrupt:
        code = INTERRUPTED
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        print("fedleak: aborted", file=sys.stderr)
        return 1
    except click.exceptions.ClickException as exc:  # usage errors: an unknown option, a non-integer --seed
        fail(exc.format_message())
        return exc.exit_code
    if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into this exit code
        print("fedleak: interrupted", file=sys.stderr)
        return INTERRUPTED
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
