"""The ``fedleak`` command line: a thin layer over the public API.

Each sub-command lives in its own module of this package and registers itself on :data:`fedleak.cli.app.app`.
Errors that come from bad input (:class:`~fedleak.errors.FedleakError`) end the command with a one-line
message and exit code 2, never a traceback.
Python warnings, and Flower's and Ray's log lines, stay off the console unless the root option ``--verbose``
is given (:class:`fedleak.cli.app.Console`).
"""

from __future__ import annotations

import sys

import typer

from fedleak.cli import commands  # noqa: F401  (sub-commands register themselves on `app`)
from fedleak.cli.app import app
from fedleak.cli.words import as_options
from fedleak.errors import FedleakError
from fedleak.exit_codes import BAD_INPUT, INTERRUPTED


def fail(message: object) -> None:
    """Print ``fedleak: error: <message>`` on one line of stderr, the library's keyword arguments named as the
    command line's options (``input_shape=(1, H, W)`` as ``--input-shape 1,H,W``)."""
    lines = (line.strip() for line in str(message).splitlines())
    print("fedleak: error: " + as_options(" ".join(line for line in lines if line)), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedleak`` script: bad input ends with one line on stderr and exit code 2, Ctrl-C
    with one line and exit code 130, never a traceback."""
    import click

    try:
        code = app(args=argv, standalone_mode=False)  # click returns the exit code instead of raising
    except FedleakError as exc:
        fail(exc)
        return BAD_INPUT
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
