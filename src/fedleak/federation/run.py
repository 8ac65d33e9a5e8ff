"""Run an audited federation on Flower's simulation engine (Ray), cleanly.

:func:`run_federation` starts Ray with minimal resources inside a private temp folder (``HOME``,
``FLWR_HOME``, ``TMPDIR`` and Ray's temp dir all point there while it runs), runs the ServerApp and
ClientApps, waits for the audit, and always shuts Ray down and removes the folder, also on an error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import numpy as np

from fedleak.defenses.base import Accounting
from fedleak.errors import FedleakError
from fedleak.federation._flwr import require_flwr
from fedleak.federation.ground_truth import GroundTruthScorer
from fedleak.federation.results import ClientRecord, DefenseRecord, FederationResult, RoundRecord
from fedleak.federation.settings import FederationSettings


@contextmanager
def isolated_environment(prefix: str = "fedleak-fl-", *, quiet: bool = False) -> Iterator[str]:
    """A temp folder that HOME/FLWR_HOME/TMPDIR/RAY_TMPDIR point to; restored and removed on exit.

    ``quiet``: processes started meanwhile (Ray's workers, the audit worker) ignore Python warnings.
    """
    base = tempfile.gettempdir()
    if len(base) > 24 and os.path.isdir("/tmp"):  # Ray's AF_UNIX socket paths must stay under 108 bytes
        base = "/tmp"
    folder = tempfile.mkdtemp(prefix=prefix, dir=base)
    keys = ("HOME", "FLWR_HOME", "TMPDIR", "RAY_TMPDIR", "PYTHONPATH", "RAY_USAGE_STATS_ENABLED",
            "RAY_DISABLE_IMPORT_WARNING", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "PYTHONWARNINGS")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for sub in ("home", "flwr", "tmp"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        os.environ.update({
            "HOME": os.path.join(folder, "home"), "FLWR_HOME": os.path.join(folder, "flwr"),
            "TMPDIR": os.path.join(folder, "tmp"), "RAY_TMPDIR": os.path.join(folder, "tmp"),
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        })
        if quiet:
            os.environ["PYTHONWARNINGS"] = "ignore"
        yield folder
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _quiet_flower_and_ray(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``: Flower's log lines below ERROR (its deprecation notices) and the Python warnings raised
    in Flower's and Ray's code are dropped while the federation runs; levels and filters are restored after."""
    if verbose:
        yield
        return
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(flwr|ray)(\.|$)")
            yield
    finally:
        flwr_logger.setLevel(old_level)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (main thread only) so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


sigterm_as_interrupt = _sigterm_as_interrupt  # public name, for the deployment runtime


def shutdown_ray() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return
    # unconditionally: an interrupt inside ray.init can leave started node processes while
    # is_initialized() is still False; shutdown() kills whatever this driver started
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort during cleanup
        pass


def package_versions() -> dict[str, str]:
    """Versions of fedleak, torch, numpy, flwr and ray, for results files."""
    from importlib.metadata import version

    out = {}
    for pkg in ("fedleak", "torch", "numpy", "flwr", "ray"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "unknown"
    return out


def run_federation(settings: FederationSettings, *, verbose: bool = False,
                   on_finding: Callable[[ClientRecord], None] | None = None) -> FederationResult:
    """Run the federation described by ``settings`` on Flower's simulation engine and audit it.

    ``verbose``: show Flower's and Ray's log lines and the Python warnings of Flower, Ray and the processes they
    start; without it only errors get through. ``settings.runtime`` other than ``"simulation"`` runs on that
    runtime instead (:mod:`fedleak.federation.runtimes`, e.g. :func:`~fedleak.federation.deployment.run_deployment`).
    """
    from fedleak.federation.runtimes import get_runtime

    runner = get_runtime(settings.runtime).runner()
    if runner is not run_federation:
        return runner(settings, verbose=verbose, on_finding=on_finding)
    require_flwr()
    from fedleak.federation.client import check_before_start, federation_accounting
    from fedleak.federation.settings import data_split

    # fail fast, before Ray starts, on anything every round would fail on: the data, the clients' model, what the
    # threat's server does, a client's step through its defenses (their settings were checked with the settings)
    split = data_split(settings.data, settings.test_size, settings.public_size)
    check_before_start(settings, split)
    defenses = defense_summary(settings, federation_accounting(settings))

    # Ray whole before Flower's threads start: two threads importing its modules at once can meet one half
    # initialised ("partially initialized module 'ray'", seen once in a federation run)
    with suppress(ImportError):  # (without Ray, Flower's simulation says what to install)
        import ray  # noqa: F401
    from flwr.simulation import run_simulation

    from fedleak.federation.client_app import make_client_app
    from fedleak.federation.server_app import build_strategy, make_server_app
    evaluations: dict[int, tuple[float, float]] = {}
    membership = None
    if settings.membership_targets:  # the server scores every update on its candidate records
        from fedleak.federation.membership import MembershipAuditor

        membership = MembershipAuditor(settings)
    start = time.perf_counter()
    with isolated_environment(quiet=not verbose) as folder, _quiet_flower_and_ray(verbose), _sigterm_as_interrupt():
        gt_dir = os.path.join(folder, "ground-truth")
        stop = threading.Event()
        if settings.secagg:  # the server sees only the aggregate: one audit of it per round (federation.secagg)
            from fedleak.federation.aggregate_audit import UnionScorer
            from fedleak.federation.secagg import make_secagg_server_app

            server_app, audit = make_secagg_server_app(
                settings, scorer=UnionScorer(gt_dir, split.value_range, normalization=split.normalization),
                ground_truth_dir=gt_dir, on_evaluate=lambda r, a, l: evaluations.__setitem__(r, (a, l)), stop=stop)
        else:
            scorer = GroundTruthScorer(gt_dir, data_range=split.value_range, normalization=split.normalization)
            strategy, audit = build_strategy(settings, scorer=scorer, on_finding=on_finding,
                                             on_update=membership.observe if membership is not None else None)
            server_app = make_server_app(settings, strategy, ground_truth_dir=gt_dir,
                                         on_evaluate=lambda r, a, l: evaluations.__setitem__(r, (a, l)), stop=stop)
        backend = {
            "client_resources": {"num_cpus": settings.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": settings.ray_cpus, "num_gpus": 0, "_temp_dir": os.path.join(folder, "r"),
                          "include_dashboard": False, "logging_level": logging.ERROR if not verbose else logging.INFO,
                          "log_to_driver": verbose},
        }
        if settings.ray_address is not None:  # join that cluster: its resources and temp dir are its own
            backend["init_args"] = {"address": settings.ray_address, "logging_level": backend["init_args"][
                "logging_level"], "log_to_driver": verbose}
        try:
            try:
                run_simulation(server_app=server_app, client_app=make_client_app(),
                               num_supernodes=settings.clients, backend_config=backend, verbose_logging=verbose)
            except SystemExit as exc:  # Ray's driver turns SIGTERM into sys.exit(15)
                if exc.code in (0, None, int(signal.SIGTERM), int(signal.SIGINT)):
                    raise KeyboardInterrupt(f"stopped by a signal (exit code {exc.code})") from None
                raise FedleakError(f"Flower stopped the simulation (exit code {exc.code})") from None
            shutdown_ray()  # the clients are done; the audit may still be finishing
            records = audit.findings()  # waits for the attacks still running
            audit.close()
        except BaseException:
            stop.set()  # the ServerApp thread stops waiting for replies
            audit.close(force=True)  # kill a running attack at once (error, Ctrl-C, SIGTERM)
            raise
        finally:
            stop.set()
            shutdown_ray()
    result = federation_result(settings, evaluations, records, audit, time.perf_counter() - start, defenses)
    if settings.secagg:
        from fedleak.federation.secagg import with_aggregates

        result = with_aggregates(result, audit)
    if membership is not None:
        result = dataclasses.replace(result, membership=membership.findings())
    return result


def federation_result(settings: FederationSettings, evaluations: dict[int, tuple[float, float]], records: list,
                      audit, seconds: float, defenses: tuple[DefenseRecord, ...]) -> FederationResult:
    """The :class:`FederationResult` of a finished run (on either runtime): ``evaluations`` maps each round (0: the
    initial model) to the global model's (test accuracy, loss), ``records`` are ``audit``'s findings (an
    :class:`~fedleak.federation.strategy.AuditFedAvg`). FedleakError when a round was never evaluated."""
    if len(evaluations) < settings.rounds + 1:
        raise FedleakError(f"the federation stopped early: the global model was evaluated after "
                           f"{len(evaluations) - 1} of {settings.rounds} rounds")
    rounds = []
    loads = {a.round: a for a in audit.audit_rounds()}
    partition_of = {r.node_id: r.client for r in records if r.client >= 0}
    for rnd in sorted(evaluations):
        here = [r for r in records if r.round == rnd]
        ok = sum(1 for r in here if r.status in ("ok", "attack-error", "not-audited"))
        sampled = tuple(sorted(partition_of.get(n, n) for n in audit.sampled.get(rnd, ())))
        rounds.append(RoundRecord(rnd, evaluations[rnd][0], evaluations[rnd][1], audit.round_seconds.get(rnd),
                                  ok, len(here) - ok, sampled, loads.get(rnd)))
    return FederationResult(settings.to_dict(), package_versions(), tuple(rounds), tuple(records),
                            seconds, audit.audit_wait_seconds, defenses,
                            audit.backlog(settings.rounds) if settings.audit else None)


def defense_summary(settings: FederationSettings, accounting: Accounting) -> tuple[DefenseRecord, ...]:
    """The clients' defense stack (none: no record), which parts Flower realised, and the (ε, δ) it gives for
    ``accounting`` (the federation's training, :func:`~fedleak.federation.client.federation_accounting`)."""
    from fedleak.federation.flower_native import native_defenses

    stack = settings.stack
    if not stack:
        return ()
    return (DefenseRecord(stack.label, settings.defenses, tuple(d.label for d in native_defenses(stack)),
                          dataclasses.asdict(accounting), tuple(p.to_dict() for p in stack.privacy(accounting))),)


def summarize(result: FederationResult) -> list[str]:
    """One line per round: test accuracy, the mean certified-and-exact fraction over the clients audited and,
    for updates nothing was certified in, the estimated PSNR of what the attack rebuilt and the route; then the
    membership inference's AUC per round, when the server scored candidates."""
    lines = []
    if result.membership:
        from fedleak.federation.membership import membership_lines

        lines.extend(membership_lines(result.membership))
    for r in result.rounds:
        recs = [c for c in result.records if c.round == r.round and c.scores is not None]
        frac = np.mean([c.scores.recovered_fraction for c in recs]) if recs else float("nan")
        skipped = [c for c in result.records if c.round == r.round and c.status not in ("ok", "not-audited")]
        extra = f", {len(skipped)} client(s) skipped" if skipped else ""
        multi = [c for c in recs if c.multi_step]
        if multi:
            psnrs = [c.scores.psnr for c in multi if _finite(c.scores.psnr)]
            routes = sorted({c.attack for c in multi if c.attack})
            extra += (f"; {len(multi)} multi-step update(s), audited by {', '.join(routes)}"
                      + (f": estimated PSNR {np.mean(psnrs):.1f} dB (uncertified)" if psnrs else ""))
        blind = [c.scores.psnr for c in recs if not c.multi_step and c.scores.recovered_fraction == 0
                 and _finite(c.scores.psnr)]  # nothing certified, yet rebuilt (a defense withholds certificates)
        if blind:
            extra += (f"; {len(blind)} update(s) with nothing certified rebuilt uncertified at an estimated "
                      f"{np.mean(blind):.1f} dB PSNR")
        if r.audit is not None and r.audit.sampled:
            extra += f"; {r.audit.text()}"
        if r.round and len(r.sampled) < result.settings.get("clients", len(r.sampled)):
            extra += f"; {len(r.sampled)} of {result.settings['clients']} clients sampled"
        lines.append(f"round {r.round}: test accuracy {r.test_accuracy:.3f}"
                     + ((f", certified and exact {frac:.1%} of the audited clients' samples{extra}" if recs
                         else f", no update scored{extra}") if r.round else ""))
    lines.extend(a.summary() for a in result.aggregates)  # secure aggregation: one audit per round's aggregate
    for d in result.defenses:
        aware = {c.defense_aware for c in result.records if c.status == "ok"}
        how = {True: "the attack modelled it", False: "the attack did not model it"}
        lines.append(f"defense {d.stack}: {d.privacy_text()}"
                     + "".join(f"; {how[a]}" for a in sorted(aware - {None})))
    return lines


def _finite(psnr: float | None) -> bool:
    """A PSNR that was measured (an update whose attack rebuilt nothing scores NaN)."""
    return psnr is not None and bool(np.isfinite(psnr))
