"""Run an audited federation on Flower's deployment runtime: a SuperLink and N SuperNodes as separate processes.

:func:`run_deployment` (``fedleak federate --runtime deployment``) does on this machine's loopback what an
operator does across machines (docs/federation.md, "Deployment runtime"):

1. writes each client's partition to a folder of its own (:mod:`fedleak.federation.node_data`);
2. starts ``flower-superlink --insecure`` and one ``flower-supernode --insecure --superlink ... --node-config
   "partition-id=i num-partitions=N data-dir=..."`` per client, each with its own ``HOME``/``FLWR_HOME``, on free
   loopback ports, and waits until they listen;
3. writes a Flower App whose components are fedleak's (:mod:`fedleak.federation.deploy_app`) and whose run
   config carries the settings, and submits it with ``flwr run APP fedleak`` (runtime dependency installation
   off: everything runs offline from this environment);
4. waits for the ServerApp's result file, watching the run's status on the SuperLink's Control API and the
   daemons (one that exits ends the run with its log's last lines);
5. stops every process it started and every process those started (:class:`~fedleak.federation.processes.
   ProcessGroup`), on success, error, Ctrl-C or SIGTERM, and removes its temp folder.

The clients score what the audit rebuilt of them themselves (:mod:`fedleak.federation.score_channel`): no folder is
shared between the server and the nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedleak.errors import FedleakError, OptionError
from fedleak.federation._flwr import require_flwr
from fedleak.federation.processes import ProcessGroup, free_port, port_open
from fedleak.federation.results import ClientRecord, FederationResult
from fedleak.federation.settings import FederationSettings

CONNECTION = "fedleak"  # the SuperLink connection's name in the run's Flower configuration
APP_NAME = "fedleak-audit"


@dataclass(frozen=True)
class DeploymentOptions:
    """Where and how long: ``host`` the daemons listen on (loopback by default), fixed ports (None: free ones
    picked when the run starts; ``node_ports`` one per client), and time limits in seconds: for the daemons to
    listen, for ``flwr run`` to submit the app, and for the whole run."""

    host: str = "127.0.0.1"
    superlink_port: int | None = None
    node_ports: tuple[int, ...] | None = None
    startup_timeout: float = 120.0
    submit_timeout: float = 180.0
    run_timeout: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("startup_timeout", "submit_timeout", "run_timeout"):
            if not getattr(self, name) > 0:
                raise OptionError(f"{name} must be positive seconds, got {getattr(self, name)}")
        ports = ([self.superlink_port] if self.superlink_port is not None else []) + list(self.node_ports or ())
        if any(not 0 < int(p) < 65536 for p in ports):
            raise OptionError(f"ports must lie in 1..65535, got {ports}")


def run_deployment(settings: FederationSettings, *, verbose: bool = False,
                   on_finding: Callable[[ClientRecord], None] | None = None,
                   options: DeploymentOptions | None = None) -> FederationResult:
    """Run the federation of ``settings`` on Flower's deployment runtime (see the module docstring) and audit it.

    ``verbose``: the daemons' log lines go to this process's stderr instead of log files. ``on_finding`` is
    called with each record once the run is over (the server runs in another process). Bad options, a daemon
    that cannot start, a run that fails or takes longer than ``options.run_timeout`` raise a one-line
    :class:`FedleakError`; every process is stopped first.
    """
    require_flwr()
    from fedleak.federation.client import check_before_start, federation_accounting
    from fedleak.federation.run import isolated_environment, sigterm_as_interrupt
    from fedleak.federation.settings import data_split

    options = options or DeploymentOptions()
    if options.node_ports is not None and len(options.node_ports) != settings.clients:
        raise OptionError(f"node_ports gives {len(options.node_ports)} port(s) for {settings.clients} clients")
    federation_accounting(settings)
    # fail fast, before anything starts: the data, the model, what the threat's server does, a client's step
    check_before_start(settings, data_split(settings.data, settings.test_size, settings.public_size))
    start = time.perf_counter()
    with isolated_environment(prefix="fedleak-dep-", quiet=not verbose) as folder, sigterm_as_interrupt():
        group = ProcessGroup()
        try:
            result = _run(settings, Path(folder), group, options, verbose)
        finally:
            group.stop()
    result = dataclasses.replace(result, seconds=time.perf_counter() - start)
    if on_finding is not None:
        for record in result.records:
            on_finding(record)
    return result


def write_partitions(settings: FederationSettings, folder: Path) -> list[Path]:
    """Each client's partition in ``folder/node-<i>`` (the folder its SuperNode's ``data-dir`` names)."""
    from fedleak.federation.client import client_partition
    from fedleak.federation.node_data import write_node_data
    from fedleak.federation.settings import data_split

    split = data_split(settings.data, settings.test_size, settings.public_size)
    dirs = []
    for i in range(settings.clients):
        x, y = client_partition(settings, i)
        write_node_data(folder / f"node-{i}", x, y, num_classes=split.num_classes, value_range=split.value_range,
                        partition=i, normalization=split.normalization)
        dirs.append(folder / f"node-{i}")
    return dirs


def _env(home: Path, verbose: bool) -> dict[str, str]:
    """A daemon's environment: its own HOME, FLWR_HOME and TMPDIR; this Python's scripts first on PATH (Flower
    starts ``flower-superexec`` and the app processes by name); no telemetry, no dependency installation."""
    for sub in ("flwr", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"HOME": str(home), "FLWR_HOME": str(home / "flwr"), "TMPDIR": str(home / "tmp"),
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1"})
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore"
    return env


def _script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _wait_listening(group: ProcessGroup, daemons, host: str, ports: list[int], timeout: float) -> None:
    end = time.monotonic() + timeout
    waiting = list(zip(daemons, ports))
    while waiting:
        dead = group.poll()
        if dead is not None:
            raise FedleakError(f"the {dead.role} exited (code {dead.process.returncode}) before it was ready: "
                               f"{dead.tail()}")
        waiting = [(d, p) for d, p in waiting if not port_open(host, p)]
        if waiting and time.monotonic() > end:
            raise FedleakError(f"the {waiting[0][0].role} did not listen on {host}:{waiting[0][1]} within "
                               f"{timeout:g} s: {waiting[0][0].tail()}")
        time.sleep(0.2)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def write_app(folder: Path, settings: FederationSettings, result_path: Path) -> Path:
    """A Flower App (``pyproject.toml`` only) whose components are :mod:`fedleak.federation.deploy_app` and whose run
    config carries ``settings`` and where the ServerApp writes its result."""
    from fedleak.federation.client_app import SETTINGS_KEY
    from fedleak.federation.deploy_app import RESULT_KEY

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "fedleak: an audited federation"
dependencies = []

[tool.flwr.app]
publisher = "fedleak"

[tool.flwr.app.components]
serverapp = "fedleak.federation.deploy_app:server_app"
clientapp = "fedleak.federation.deploy_app:client_app"

[tool.flwr.app.config]
{SETTINGS_KEY} = {_toml_string(settings.to_json())}
{RESULT_KEY} = {_toml_string(str(result_path))}
""")
    (folder / "README.md").write_text("fedleak's audited federation (generated by fedleak federate).\n")
    return folder


def _run(settings: FederationSettings, folder: Path, group: ProcessGroup, options: DeploymentOptions,
         verbose: bool) -> FederationResult:
    from fedleak.federation.result_codec import load_result

    host = options.host
    data_dirs = write_partitions(settings, folder / "data")
    logs = folder / "logs"

    def log(role: str) -> Path | None:
        return None if verbose else logs / f"{role.replace(' ', '-')}.log"

    link_port = options.superlink_port or free_port(host)
    link = group.start("superlink", [_script("flower-superlink"), "--insecure", "--host", host, "--port",
                                     str(link_port), "--disable-runtime-dependency-installation"],
                       env=_env(folder / "superlink", verbose), log=log("superlink"))
    _wait_listening(group, [link], host, [link_port], options.startup_timeout)
    node_ports = list(options.node_ports or [free_port(host) for _ in range(settings.clients)])
    nodes = []
    for i, (data_dir, port) in enumerate(zip(data_dirs, node_ports)):
        node_config = f'partition-id={i} num-partitions={settings.clients} data-dir={_toml_string(str(data_dir))}'
        nodes.append(group.start(f"supernode {i}", [
            _script("flower-supernode"), "--insecure", "--superlink", f"{host}:{link_port}", "--host", host,
            "--port", str(port), "--node-config", node_config], env=_env(folder / f"supernode-{i}", verbose),
            log=log(f"supernode {i}")))
    _wait_listening(group, nodes, host, node_ports, options.startup_timeout)

    cli_home = folder / "cli"
    env = _env(cli_home, verbose)
    (cli_home / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{host}:{link_port}"\n'
        "insecure = true\n")
    result_path = folder / "server" / "result.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    app = write_app(folder / "app", settings, result_path)
    run_id = _submit(app, env, options.submit_timeout)
    _wait_for_result(group, result_path, run_id, f"{host}:{link_port}", options.run_timeout)
    return load_result(result_path.read_text())


def _submit(app: Path, env: dict[str, str], timeout: float) -> int:
    """``flwr run APP fedleak --format json``; the run id."""
    try:
        done = subprocess.run([_script("flwr"), "run", str(app), CONNECTION, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FedleakError(f"'flwr run' did not submit the app within {timeout:g} s") from None
    try:
        payload = json.loads(done.stdout[done.stdout.index("{"):])
        if payload.get("success") and payload.get("run-id"):
            return int(payload["run-id"])
    except (ValueError, TypeError):
        payload = {}
    why = " | ".join(line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip())[-400:]
    raise FedleakError(f"'flwr run' could not start the run (exit code {done.returncode}): {why}")


def run_status(address: str, run_id: int) -> tuple[str, str, str]:
    """(status, sub-status, details) of the run ``run_id`` on the SuperLink at ``address``, from its Control API
    (status ``"finished"`` with sub-status ``"completed"``, ``"failed"`` or ``"stopped"`` when it is over)."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    with contextlib.redirect_stdout(io.StringIO()):  # it announces the connection on stdout
        client = init_http_client_from_connection(SuperLinkConnection(CONNECTION, address=address, insecure=True))
    try:
        run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict[run_id]
        return run.status.status, run.status.sub_status, run.status.details
    finally:
        client.close()


def _wait_for_result(group: ProcessGroup, result_path: Path, run_id: int, address: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    next_check = 0.0
    while not result_path.is_file():
        dead = group.poll()
        if dead is not None:
            raise FedleakError(f"the {dead.role} exited (code {dead.process.returncode}) during the run: "
                               f"{dead.tail()}")
        if time.monotonic() >= next_check:
            status, sub, details = run_status(address, run_id)
            if status == "finished" and not result_path.is_file():
                raise FedleakError(f"the run ended ({sub}) without a result: {details or 'no details'}")
            next_check = time.monotonic() + 2.0
        if time.monotonic() > end:
            raise FedleakError(f"the run did not finish within {timeout:g} s")
        time.sleep(0.2)
