"""Rounds per minute of an audited federation, with and without the audit, and the audit's lag.

    .venv/bin/python benchmarks/bench_federation.py [--clients 10 50] [--rounds 4] [--local-epochs 0]
        [--modes off process thread sync] [--out FILE.json]
    .venv/bin/python benchmarks/bench_federation.py --scale [--clients 10 100 500] [--rounds 6]
        [--per-round 10] [--shared-ray --ray-cpus 2] [--out benchmarks/results/federation_scale.json]

Each configuration is one Flower simulation (Ray, ``ray_cpus`` CPUs, ``client_cpus`` per client actor),
honest-but-curious server (exclusivity attack on every update, or on a seeded sample of them when
``--audit-backlog`` bounds the audit's backlog), batch 16, one local step. Round 1 includes Ray's actor
start-up, so the steady-state rate is taken over rounds 2..R (strategy time from configure_train to the end of
aggregate_train). Audit modes: ``off`` (no attack), ``process`` (attacks in ``--audit-workers`` worker
processes, the default), ``thread`` (a background thread), ``sync`` (inside aggregate_train).
``audit_wait_s`` is how long the run waited after the last round for attacks still running; ``lag_s`` per round
is the time from the end of the round's aggregation to its last audit result; ``backlog_at_end`` the audit jobs
still pending when the last round was aggregated.

Default table: Fashion-MNIST, MLP 784-1000-10, every client every round (10 and 50 clients). ``--scale``:
Fashion-MNIST, MLP 784-100-10, ``--per-round`` clients sampled per round (``fraction_train = per_round /
clients``) at 10, 100 and 500 clients, audit off and on (``process``); each row also records the rate relative
to the unaudited run of the same size (``rate_vs_off``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from fedleak.federation import FederationSettings, run_federation

HEAD = """
import sys, ray
ray.init(num_cpus=int(sys.argv[2]), num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@contextlib.contextmanager
def ray_cluster(cpus: int) -> Iterator[str]:
    """A local Ray cluster of ``cpus`` CPUs in a child process, for every configuration to join (``ray_address``):
    Ray starts once, not once per run (on a loaded machine its start alone can time out). Stopped on exit."""
    folder = tempfile.mkdtemp(prefix="fl-bench-ray-", dir="/tmp")
    head = subprocess.Popen([sys.executable, "-c", HEAD, folder, str(cpus)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        if not address:
            raise RuntimeError("the Ray head did not start")
        yield address
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
            head.wait()
        shutil.rmtree(folder, ignore_errors=True)


def bench(clients: int, rounds: int, mode: str, ray_cpus: int, local_epochs: int = 0, *, hidden: tuple = (1000,),
          fraction_train: float = 1.0, audit_workers: int = 1, audit_backlog: int | None = None,
          client_cpus: float = 1.0, ray_address: str | None = None) -> dict:
    settings = FederationSettings(clients=clients, rounds=rounds, threat="honest", batch_size=16, hidden=hidden,
                                  local_epochs=local_epochs, fraction_train=fraction_train,
                                  audit=mode != "off", audit_mode=mode if mode != "off" else "process",
                                  audit_workers=audit_workers, audit_backlog=audit_backlog, ray_cpus=ray_cpus,
                                  client_cpus=client_cpus, ray_address=ray_address, test_size=1000, public_size=1000,
                                  seed=0)
    start = time.perf_counter()
    res = run_federation(settings)
    wall = time.perf_counter() - start
    steady = [r.seconds for r in res.rounds if r.round >= 2 and r.seconds]
    audited = [c for c in res.records if c.status == "ok"]
    loads = [r.audit for r in res.rounds if r.audit is not None]
    lags = [a.lag_seconds for a in loads if a.lag_seconds is not None]
    return {
        "clients": clients, "rounds": rounds, "audit": mode, "ray_cpus": ray_cpus, "client_cpus": client_cpus,
        "ray": "joined cluster" if ray_address else "private",
        "local_epochs": local_epochs, "hidden": list(hidden), "fraction_train": fraction_train,
        "sampled_per_round": [len(r.sampled) for r in res.rounds if r.round >= 1],
        "audit_workers": audit_workers if mode == "process" else None, "audit_backlog_bound": audit_backlog,
        "wall_s": round(wall, 1),
        "round_s": [round(r.seconds, 2) if r.seconds else None for r in res.rounds if r.round >= 1],
        "rounds_per_min_steady": round(60 * len(steady) / sum(steady), 1) if steady else None,
        "audit_wait_s": round(res.audit_wait_seconds, 1),
        "lag_s": [round(a.lag_seconds, 2) if a.lag_seconds is not None else None for a in loads],
        "lag_s_max": round(max(lags), 2) if lags else None,
        "backlog_at_end": res.audit_backlog_at_end,
        "updates_received": sum(a.received for a in loads), "updates_audited": sum(a.audited for a in loads),
        "audited_per_round": [a.audited for a in loads],
        "attack_s_mean": round(sum(c.attack_seconds for c in audited) / len(audited), 3) if audited else None,
        "attack_s_total": round(sum(c.attack_seconds for c in audited), 1) if audited else None,
        "recovered_mean": round(sum(c.scores.recovered_fraction for c in audited) / len(audited), 3) if audited else None,
        "test_accuracy": [round(r.test_accuracy, 3) for r in res.rounds],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
    }


def scale_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for clients in args.clients:
        fraction = min(1.0, args.per_round / clients)
        off = None
        for mode in args.modes:
            row = bench(clients, args.rounds, mode, args.ray_cpus, hidden=(args.width,), fraction_train=fraction,
                        audit_workers=args.audit_workers, audit_backlog=args.audit_backlog,
                        client_cpus=args.client_cpus, ray_address=args.ray_address)
            if mode == "off":
                off = row["rounds_per_min_steady"]
            rate = row["rounds_per_min_steady"]
            row["rate_vs_off"] = round(rate / off, 2) if off and rate else None
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", action="store_true", help="the 10/100/500-client table (784-100-10, sampled clients)")
    p.add_argument("--clients", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=None)
    p.add_argument("--ray-cpus", type=int, default=1)
    p.add_argument("--client-cpus", type=float, default=1.0)
    p.add_argument("--local-epochs", type=int, default=0, help="0: one SGD step per round (the exact attacks' setting)")
    p.add_argument("--per-round", type=int, default=10, help="--scale: clients sampled per round")
    p.add_argument("--width", type=int, default=100, help="--scale: hidden width of the MLP")
    p.add_argument("--audit-workers", type=int, default=1)
    p.add_argument("--audit-backlog", type=int, default=None)
    p.add_argument("--shared-ray", action="store_true",
                   help="start one Ray cluster of --ray-cpus CPUs that every configuration joins")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.ray_address = None
    start = time.perf_counter()
    if args.scale:
        args.clients = args.clients or [10, 100, 500]
        args.rounds = args.rounds or 6
        args.modes = args.modes or ["off", "process"]
        with ray_cluster(args.ray_cpus) if args.shared_ray else contextlib.nullcontext(None) as address:
            args.ray_address = address
            rows = scale_rows(args)
    else:
        rows = []
        for clients in args.clients or [10, 50]:
            for mode in args.modes or ["off", "process", "thread", "sync"]:
                row = bench(clients, args.rounds or 4, mode, args.ray_cpus, args.local_epochs,
                            audit_workers=args.audit_workers, audit_backlog=args.audit_backlog,
                            client_cpus=args.client_cpus)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        from fedleak.federation.run import package_versions

        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"machine": f"{os.cpu_count()}-core CPU (shared with other jobs)", "data": "fashion-mnist",
                       "versions": package_versions(), "seed": 0, "seconds": round(time.perf_counter() - start, 1),
                       "args": vars(args), "rows": rows}, fh, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
