"""Audit under Flower's SecAgg+: per threat, what the attack on each round's aggregate recovers, with the run time
against the same federation without secure aggregation.

    python benchmarks/bench_secagg.py [--data fashion-mnist] [--rounds 1] [--threats honest,trap-weights,imprint]

Prints one JSON line per run (threat, SecAgg+ setting, recovered fraction of the round's data, certified, false
certificates, clients touched, measured quantization error, seconds) and writes them all, with the versions and
settings, to ``benchmarks/results/secagg.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedleak.federation import FederationSettings, run_federation
from fedleak.report.output import environment_info, write_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "secagg.json"

SETTINGS = {
    "off": {"secagg": False},
    "flower-defaults": {"secagg": True},
    "tight-float32": {"secagg": True, "secagg_clipping_range": 0.02, "secagg_quantization_range": 2**29,
                      "secagg_max_weight": 16},
    "tight-float64": {"secagg": True, "secagg_clipping_range": 0.02, "secagg_quantization_range": 2**29,
                      "secagg_max_weight": 16, "secagg_upload_dtype": "float64"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threats", default="honest,trap-weights,imprint")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    rows = []
    for threat in args.threats.split(","):
        for name in args.settings.split(","):
            s = FederationSettings(data=args.data, clients=args.clients, rounds=args.rounds, threat=threat,
                                   batch_size=16, seed=0, **SETTINGS[name])
            start = time.perf_counter()
            result = run_federation(s)
            seconds = time.perf_counter() - start
            out = {"threat": threat, "secagg": name, "seconds": round(seconds, 1)}
            if result.aggregates:
                a = result.aggregates[-1]
                sc = a.scores
                out.update(round=a.round, samples=a.num_examples, certified=a.certified,
                           recovered=sc.recovered if sc else None,
                           fraction=round(sc.recovered_fraction, 3) if sc else None,
                           false=sc.false_certificates if sc else None, psnr=round(sc.psnr, 1) if sc and sc.psnr else None,
                           clients_touched=a.clients_touched, per_client=[c.recovered for c in a.shares],
                           bound=a.quantization.bound, max_error=a.quantization.max_error,
                           rel_error=a.quantization.relative_error, clipped=a.quantization.clipped,
                           attack_s=round(a.attack_seconds or 0, 2))
            else:
                recs = [r for r in result.records if r.round == args.rounds and r.scores is not None]
                out.update(recovered=sum(r.scores.recovered for r in recs),
                           samples=sum(r.scores.batch_size for r in recs),
                           per_client=[r.scores.recovered for r in recs],
                           false=sum(r.scores.false_certificates for r in recs))
            print(json.dumps(out), flush=True)
            rows.append({**out, "settings": s.to_dict()})
    write_json(RESULTS, {"environment": environment_info(), "seed": 0, "data": args.data, "clients": args.clients,
                         "rounds": args.rounds, "runs": rows})


if __name__ == "__main__":
    main()
