"""The default defense grid of ``fedleak evaluate`` for FedSGD clients (one SGD step per round, the server reads the
gradient) and for FedAvg clients (several local steps of SGD with momentum and weight decay, the server reads the
weights they send back), in the same run: the table "FedAvg clients" of docs/defenses.md.

    .venv/bin/python benchmarks/bench_fedavg_defenses.py                      # 5 local steps, momentum 0.9
    .venv/bin/python benchmarks/bench_fedavg_defenses.py --local-steps 3 --lr 0.1

Both evaluations attack with the exact attack, DLM+ (weights only: nothing to read from a FedSGD gradient) and IG,
on Fashion-MNIST (4 clients of 500 training images, 2,000 test images) with ``fedleak evaluate``'s default MLP
(784-256-10). The results (versions, seed, settings, every cell of both) go to
``benchmarks/results/defenses_fedavg.json``; the markdown table is printed. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from run_meta import run_meta, write_results

from fedleak.evaluation import Evaluation, EvaluationSettings, evaluate
from fedleak.evaluation.report import results_payload

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "benchmarks" / "results" / "defenses_fedavg.json"
ATTACKS = ("exclusivity", "dlm+", "ig")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    common = dict(data="fashion-mnist-train", test_data="fashion-mnist", attacks=ATTACKS, rounds=args.rounds,
                  lr=args.lr, attack_iterations=args.iterations, seed=args.seed)
    runs = {"fedsgd": EvaluationSettings(**common),
            "fedavg": EvaluationSettings(**common, local_steps=args.local_steps, momentum=args.momentum,
                                         weight_decay=args.weight_decay)}
    results: dict[str, Evaluation] = {}
    with tempfile.TemporaryDirectory() as tmp:  # no resuming across runs: both are measured in this one
        for name, settings in runs.items():
            results[name] = evaluate(settings, out=Path(tmp) / name, progress=None)
    write_results(TARGET, meta=run_meta(" ".join(sys.argv), **vars(args)),
                  **{name: results_payload(ev) for name, ev in results.items()})
    print(f"FedSGD: {runs['fedsgd'].training()}; FedAvg: {runs['fedavg'].training()}")
    print("| defense | FedSGD: leaked (certified) | best attack | accuracy | ε | FedAvg: leaked (certified) | "
          "best attack | accuracy | ε |")
    print("|---|---|---|---|---|---|---|---|---|")
    for sgd, avg in zip(results["fedsgd"].rows, results["fedavg"].rows, strict=True):
        cells = []
        for row in (sgd, avg):
            best = row.best
            eps = "" if row.utility.epsilon is None else f"{row.utility.epsilon:.3g}"
            certified = max(c.recovered for c in row.leakage)
            cells.append(f"{best.leaked_fraction:.0%} ({certified}/{best.samples}) | {best.attack} "
                         f"({best.psnr:.1f} dB) | {row.utility.accuracy:.1%} | {eps}")
        print(f"| {sgd.defense} | {' | '.join(cells)} |")
    seconds = {name: round(ev.seconds) for name, ev in results.items()}
    print(json.dumps({"results": str(TARGET.relative_to(ROOT)), "seconds": seconds}))


if __name__ == "__main__":
    main()
