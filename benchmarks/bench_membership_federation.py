"""The active membership attack inside a federation, against the passive server, in a paired design: the same
federation (same seed, data, warm-up rounds and local batches) runs its attacked round twice, once with the
honest server's weights and once with the active server's (gradient ascent on the candidates, Nasr, Shokri &
Houmansadr, IEEE S&P 2019), and the server's membership scores of the clients' updates are compared in that
round. The clients train with fedleak's client code (the code Flower's ClientApp runs), outside the Flower
runtime, so that several seeds and step rules fit a few minutes of a 2-core CPU.

    .venv/bin/python benchmarks/bench_membership_federation.py             # full run (3 seeds, 4 step rules)
    .venv/bin/python benchmarks/bench_membership_federation.py --quick     # 1 seed, 1 step rule

Writes ``benchmarks/results/membership_federation.json`` (versions, settings, seeds, every per-client metric)
and prints the markdown table of docs/membership_federation.md. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from fedleak.federation.membership import SCORES, PairedRound, paired_round
from fedleak.federation.settings import FederationSettings
from fedleak.report.output import environment_info, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Fashion-MNIST (10 000 records installed): 8 200 test, 1 000 public, 800 left: 4 clients of 200 records
BASE = FederationSettings(data="fashion-mnist", clients=4, test_size=8200, public_size=1000, hidden=(256,),
                          local_epochs=5, batch_size=16, lr=0.1, membership_targets=256, audit=False)
RULES = {  # step rule name: (target loss in nats, public drift bound in nats, last layers (0: all))
    "target 2.5 nats, all layers": dict(membership_target_loss=2.5, membership_max_drift=0.5),
    "target 5 nats, all layers": dict(membership_target_loss=5.0, membership_max_drift=1.0),
    "target 3 nats, drift 5, all layers": dict(membership_target_loss=3.0, membership_max_drift=5.0),
    "target 3 nats, drift 5, last layer": dict(membership_target_loss=3.0, membership_max_drift=5.0,
                                                membership_last_layers=2),
    "target 2.5 nats, last layer": dict(membership_target_loss=2.5, membership_max_drift=0.5,
                                        membership_last_layers=2),
    "target 5 nats, last layer": dict(membership_target_loss=5.0, membership_max_drift=1.0,
                                      membership_last_layers=2),
}


def client_means(records, score: str) -> tuple[float, float]:
    mine = [r.metrics for r in records if r.score == score and r.client >= 0]
    return float(np.mean([m.auc for m in mine])), float(np.mean([m.tpr_at_1pct_fpr for m in mine]))


def summary(runs: list[PairedRound]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ("honest", "active"):
        out[mode] = {}
        for score in SCORES:
            per_seed = np.array([client_means(getattr(r, mode), score) for r in runs])
            out[mode][score] = {"auc_mean": float(per_seed[:, 0].mean()), "auc_std": float(per_seed[:, 0].std()),
                                "tpr1_mean": float(per_seed[:, 1].mean()), "tpr1_std": float(per_seed[:, 1].std())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--round", type=int, default=4, help="the attacked round (the rounds before: warm-up)")
    parser.add_argument("--rules", default=";".join(RULES), help="step rules, names of RULES separated by ;")
    parser.add_argument("--epochs", type=int, default=BASE.local_epochs, help="local epochs per round")
    parser.add_argument("--out", type=Path, default=RESULTS / "membership_federation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    rules = [next(iter(RULES))] if args.quick else args.rules.split(";")
    start = time.perf_counter()
    results = []
    for rule in rules:
        runs = []
        for seed in range(seeds):
            settings = dataclasses.replace(BASE, seed=seed, local_epochs=args.epochs, **RULES[rule])
            t = time.perf_counter()
            run = paired_round(settings, args.round)
            runs.append(run)
            print(f"{rule}, seed {seed}: step {run.ascent.step:.3g}, candidates' loss {run.ascent.loss_before:.2f}"
                  f" -> {run.ascent.loss_after:.2f}, public drift {run.ascent.public_drift:.2f}, test accuracy "
                  f"{run.accuracy[0]:.3f} -> {run.accuracy[1]:.3f}; "
                  + ", ".join(f"{s} {client_means(run.honest, s)[0]:.3f}/{client_means(run.active, s)[0]:.3f}"
                              for s in SCORES) + f" ({time.perf_counter() - t:.0f} s)", flush=True)
        results.append({
            "rule": rule, "options": RULES[rule], "summary": summary(runs),
            "runs": [{"seed": seed, "step": r.ascent.step, "loss_before": r.ascent.loss_before,
                      "loss_after": r.ascent.loss_after, "public_drift": r.ascent.public_drift,
                      "accuracy_honest": r.accuracy[0], "accuracy_tampered": r.accuracy[1],
                      "honest": [m.to_dict() | {"fpr": None, "tpr": None} for m in r.honest],
                      "active": [m.to_dict() | {"fpr": None, "tpr": None} for m in r.active]}
                     for seed, r in enumerate(runs)]})
        print(table_rows(rule, results[-1]["summary"]))
    write_json(args.out, {"environment": environment_info(), "settings": BASE.to_dict(), "attacked_round": args.round,
                          "seeds": list(range(seeds)), "seconds": time.perf_counter() - start, "results": results})
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


def table_rows(rule: str, summ: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for mode in ("honest", "active"):
        cells = [f"{summ[mode][s]['auc_mean']:.3f} ± {summ[mode][s]['auc_std']:.3f} "
                 f"({summ[mode][s]['tpr1_mean']:.2f} ± {summ[mode][s]['tpr1_std']:.2f})" for s in SCORES]
        lines.append(f"| {rule if mode == 'active' else 'none (passive)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
