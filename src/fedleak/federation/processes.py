"""The operating-system processes a deployment run starts, and stopping every one of them.

Flower's daemons start processes of their own (``flower-superlink`` starts ``flower-superexec``, which starts
``flwr-serverapp``; each ``flower-supernode`` starts a ``flower-superexec`` and one ``flwr-clientapp`` per message),
some in new sessions, so neither a process group nor the daemons' own clean-up can be relied on. A
:class:`ProcessGroup` starts each daemon in a session of its own with its output in a log file, remembers every
descendant it has seen (read from ``/proc``, refreshed by :meth:`ProcessGroup.poll` while the run lasts), and
:meth:`ProcessGroup.stop` sends SIGTERM to all of them, waits, then SIGKILLs whatever is left. It also runs at
interpreter exit, so a crash of the caller leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedleak.errors import FedleakError


@dataclass(frozen=True)
class Daemon:
    """One process the group started: its role (``"superlink"``, ``"supernode 2"``), the process, its log."""

    role: str
    process: subprocess.Popen
    log: Path | None  # None: its output went to this process's

    def tail(self, lines: int = 3) -> str:
        """The last ``lines`` non-empty lines of its log, joined by ' | ' (for one-line error messages)."""
        if self.log is None:
            return "see its output above"
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in [t for t in text if t.strip()][-lines:])


def _children() -> dict[int, list[int]]:
    """Every process's children, from ``/proc/<pid>/stat`` (empty where ``/proc`` does not exist)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pids: Sequence[int]) -> set[int]:
    """``pids`` and all their descendants alive now."""
    children, seen, todo = _children(), set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    fields = _stat(pid)
    if fields is None:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return fields[0] not in ("Z", "X")


def started(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot; "" where unknown): with the pid, who a process is, since
    pids are reused."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ProcessGroup:
    """Processes started for one run; :meth:`stop` ends them all (also at interpreter exit)."""

    def __init__(self, grace: float = 10.0) -> None:
        self.grace = grace
        self.daemons: list[Daemon] = []
        self.seen: dict[int, str] = {}  # pid -> start time (pids are reused)
        atexit.register(self.stop)

    def start(self, role: str, command: Sequence[str], *, env: Mapping[str, str], log: Path | None,
              cwd: str | os.PathLike[str] | None = None) -> Daemon:
        """Start ``command`` in a session of its own, stdout and stderr to ``log`` (None: to this process's)."""
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with open(log if log is not None else os.devnull, "ab") as out:
            try:
                proc = subprocess.Popen(list(command), env=dict(env), stdout=out if log is not None else None,
                                        stderr=subprocess.STDOUT if log is not None else None,
                                        stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
            except OSError as exc:
                raise FedleakError(f"cannot start the {role} ({command[0]}): {exc.strerror or exc}") from None
        daemon = Daemon(role, proc, log)
        self.daemons.append(daemon)
        self._remember([proc.pid])
        return daemon

    def _remember(self, pids) -> None:
        for pid in pids:
            self.seen.setdefault(pid, started(pid))

    def poll(self) -> Daemon | None:
        """Remember the daemons' descendants now; the first daemon that has exited, or None."""
        self._remember(descendants(sorted(p for p, when in self.seen.items() if started(p) == when)))
        return next((d for d in self.daemons if d.process.poll() is not None), None)

    def pids(self) -> set[int]:
        """Every process of the group seen so far that still runs."""
        self.poll()
        return {pid for pid, when in self.seen.items() if alive(pid) and started(pid) == when}

    def stop(self) -> None:
        """SIGTERM to every process of the group, SIGKILL after ``grace`` seconds to those left; reaps the
        daemons. Safe to call more than once."""
        pids = self.pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        end = time.monotonic() + self.grace
        while time.monotonic() < end and self.pids():  # pids() also picks up processes started meanwhile
            time.sleep(0.1)
        for pid in self.pids():
            _signal(pid, signal.SIGKILL)
        end = time.monotonic() + 10  # SIGKILL takes effect when the kernel gets to it: wait until all are gone
        while time.monotonic() < end and self.pids():
            for pid in self.pids():
                _signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        for d in self.daemons:
            try:
                d.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                pass
        self.seen.clear()
        atexit.unregister(self.stop)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # gone already, or not ours
        pass
