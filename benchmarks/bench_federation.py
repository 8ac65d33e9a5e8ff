"""Rounds per minute of an audited federation, with and without the audit (10 and 50 clients).

    .venv/bin/python benchmarks/bench_federation.py [--clients 10 50] [--rounds 4] [--local-epochs 0]
        [--modes off process thread sync] [--out FILE.json]

Each configuration is one Flower simulation (Ray, ``ray_cpus`` CPUs, one per client actor) on
Fashion-MNIST, honest-but-curious server (exclusivity attack on every update), MLP 784-1000-10,
batch 16, one local step. Round 1 includes Ray's actor start-up, so the steady-state rate is taken
over rounds 2..R (strategy time from configure_train to the end of aggregate_train). Audit modes:
``off`` (no attack), ``process`` (attacks in one worker process, the default), ``thread`` (a
background thread), ``sync`` (inside aggregate_train). ``audit_wait_s`` is how long the run waited
after the last round for attacks still running.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from fedleak.federation import FederationSettings, run_federation


def bench(clients: int, rounds: int, mode: str, ray_cpus: int, local_epochs: int = 0) -> dict:
    settings = FederationSettings(clients=clients, rounds=rounds, threat="honest", batch_size=16, hidden=(1000,),
                                  local_epochs=local_epochs,
                                  audit=mode != "off", audit_mode=mode if mode != "off" else "process", ray_cpus=ray_cpus,
                                  test_size=1000, public_size=1000, seed=0)
    start = time.perf_counter()
    res = run_federation(settings)
    wall = time.perf_counter() - start
    steady = [r.seconds for r in res.rounds if r.round >= 2 and r.seconds]
    audited = [c for c in res.records if c.status == "ok"]
    return {
        "clients": clients, "rounds": rounds, "audit": mode, "ray_cpus": ray_cpus, "local_epochs": local_epochs,
        "wall_s": round(wall, 1),
        "round_s": [round(r.seconds, 2) if r.seconds else None for r in res.rounds if r.round >= 1],
        "rounds_per_min_steady": round(60 * len(steady) / sum(steady), 1) if steady else None,
        "audit_wait_s": round(res.audit_wait_seconds, 1),
        "attack_s_mean": round(sum(c.attack_seconds for c in audited) / len(audited), 3) if audited else None,
        "attack_s_total": round(sum(c.attack_seconds for c in audited), 1) if audited else None,
        "recovered_mean": round(sum(c.scores.recovered_fraction for c in audited) / len(audited), 3) if audited else None,
        "test_accuracy": [round(r.test_accuracy, 3) for r in res.rounds],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["off", "process", "thread", "sync"])
    p.add_argument("--ray-cpus", type=int, default=1)
    p.add_argument("--local-epochs", type=int, default=0, help="0: one SGD step per round (the exact attacks' setting)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for clients in args.clients:
        for mode in args.modes:
            row = bench(clients, args.rounds, mode, args.ray_cpus, args.local_epochs)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"machine": f"{os.cpu_count()} cores (shared)", "rows": rows}, fh, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
