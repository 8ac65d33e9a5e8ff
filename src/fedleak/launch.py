"""The ``fedleak`` script's entry point: it imports the command line inside a guard, so that Ctrl-C during
start-up ends with one line and exit code 130, like Ctrl-C at any later point (a command imports torch and the
rest only when it runs, inside :func:`fedleak.cli.main`)."""

from __future__ import annotations

import sys

from fedleak.exit_codes import INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    try:
        from fedleak.cli import main as run
    except KeyboardInterrupt:
        print("fedleak: interrupted", file=sys.stderr)
        return INTERRUPTED
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
