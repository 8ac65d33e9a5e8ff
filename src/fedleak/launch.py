"""The ``fedleak`` script's entry point: it imports the command line inside a guard, so that Ctrl-C during
start-up ends with one line and exit code 130, like Ctrl-C at any later point (a command imports torch and the
rest only when it runs, inside :func:`fedleak.cli.main`).

Ctrl-C that arrives while a module is being imported is held until the import is done
(:class:`HeldDuringImports`): a KeyboardInterrupt raised inside a native library's start-up does not unwind
cleanly. Measured on torch 2.13.0 (Python 3.11), a SIGINT during ``fedleak audit``'s imports aborted the process
in C++ ("terminate called after throwing an instance of 'pybind11::error_already_set'"), surfaced as an
unrelated ``TypeError`` from ``ssl``, or ended the process by the signal after the one-line message.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from types import FrameType

from fedleak.exit_codes import INTERRUPTED

RECHECK_S = 0.02  # how often a held Ctrl-C checks whether the import is done


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the main thread's current frame) runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class HeldDuringImports:
    """While active, Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as Python's own handler does, except
    inside an import: there it is held, and raised at the first check (every ``RECHECK_S``) that finds the
    import done. A second Ctrl-C while one is held raises at once (an import that runs long: a model file that
    trains when it is imported). Installed only in the main thread and only over Python's default handler (a
    SIGINT that the process ignores, as a background job's, stays ignored)."""

    def __enter__(self) -> HeldDuringImports:
        self.previous = signal.getsignal(signal.SIGINT)
        self.active = (threading.current_thread() is threading.main_thread()
                       and self.previous is signal.default_int_handler)
        self.held = self.rechecking = False
        self.check: threading.Timer | None = None
        if self.active:
            signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        self.held = False  # a check still under way finds nothing to deliver ...
        if self.check is not None:
            self.check.cancel()
            self.check.join()
        self.settle()  # ... and is taken here, while this handler is still installed
        if self.active:
            signal.signal(signal.SIGINT, self.previous)

    def settle(self) -> None:
        """A Python call: the interpreter runs pending signal handlers on entering it."""

    def handle(self, signum: int, frame: FrameType | None) -> None:
        recheck, self.rechecking = self.rechecking, False
        if recheck and not self.held:
            return  # a check of a Ctrl-C already delivered
        if not importing(frame) or (self.held and not recheck):
            self.held = False
            raise KeyboardInterrupt
        self.held = True
        self.check = threading.Timer(RECHECK_S, self.recheck)
        self.check.daemon = True
        self.check.start()

    def recheck(self) -> None:
        """Call :meth:`handle` again, in the main thread, marked as a check rather than a new Ctrl-C."""
        if self.held:
            self.rechecking = True
            _thread.interrupt_main()


def main(argv: list[str] | None = None) -> int:
    with HeldDuringImports():
        try:
            from fedleak.cli import main as run
        except KeyboardInterrupt:
            print("fedleak: interrupted", file=sys.stderr)
            return INTERRUPTED
        return run(argv)


if __name__ == "__main__":
    sys.exit(main())
