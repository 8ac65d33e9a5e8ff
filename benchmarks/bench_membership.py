"""Membership inference on real data: every passive attack of ``fedleak.membership`` against an overfit and a
well-generalised Fashion-MNIST MLP and a retina-patch MLP, and the LOSS, confidence and gradient-norm attacks
against the overfit scenario's training under DP-SGD (Opacus) at three noise multipliers, with ε, and under data
augmentation (flips; flips and shifts of up to 2 or 4 pixels), there with the augmentation-aware loss as well. The
tables and ROC figure of docs/membership.md.

    .venv/bin/python benchmarks/bench_membership.py            # full run (about 10 minutes of CPU time; longer when the cores are shared)
    .venv/bin/python benchmarks/bench_membership.py --quick    # smoke run, small settings

Writes ``benchmarks/results/membership.json`` (``membership_quick.json`` with ``--quick``: versions, seed,
settings, every metric and ROC curve) and ``docs/membership_roc.png`` (full run only), and prints the
markdown tables. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fedleak.membership import make_membership_attack as attack
from fedleak.membership.experiment import MembershipResult, MembershipSettings, run_membership
from fedleak.membership.plots import roc_png
from fedleak.report.output import environment_info, write_bytes_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def scenarios(quick: bool, seed: int) -> dict[str, MembershipSettings]:
    scale = 5 if quick else 1
    passive = ("loss", "confidence", "modified-entropy", "gradient-norm", attack("whitebox", shadows=2),
               "whitebox-unsupervised", attack("lira", shadows=4), "update-alignment")
    cheap = ("loss", attack("whitebox", shadows=2), attack("lira", shadows=4))
    return {
        "overfit": MembershipSettings(members=500 // scale, non_members=1000 // scale, reference=1000 // scale,
                                      epochs=100 // scale, attacks=passive, seed=seed),
        "generalised": MembershipSettings(members=5000 // scale, non_members=1000 // scale,
                                          reference=6000 // scale, epochs=10 // min(scale, 2), attacks=cheap,
                                          seed=seed),
        "retina": MembershipSettings(data="retina", members=300 // scale, non_members=300 // scale,
                                     reference=600 // scale, epochs=150 // scale, batch_size=30, lr=0.05,
                                     attacks=cheap, seed=seed),
        # DP-SGD (Opacus) on the overfit scenario's training, three noise multipliers; cheap attacks only
        **{f"dp-sgd z={z:g}": MembershipSettings(
            members=500 // scale, non_members=1000 // scale, reference=0, epochs=100 // scale,
            defense=f"dp-sgd:noise_multiplier={z:g},max_grad_norm=1.0", attacks=("loss", "confidence", "gradient-norm"),
            seed=seed) for z in (0.5, 1.0, 2.0)},
        # data augmentation (flips; flips and shifts of up to 2 or 4 pixels) on the overfit scenario's training
        **{f"augmentation padding={p}": MembershipSettings(
            members=500 // scale, non_members=1000 // scale, reference=0, epochs=100 // scale,
            defense=f"augmentation:padding={p}",
            attacks=("loss", "confidence", "gradient-norm", attack("augmented-loss", padding=p)), seed=seed)
           for p in (0, 2, 4)},
    }


def table(name: str, result: MembershipResult) -> str:
    s = result.settings
    eps = f", ε = {result.epsilon:.2f} (δ = 1e-5)" if result.epsilon is not None else ""
    lines = [f"**{name}**: {s.data}, MLP {list(s.widths)}, {s.members} members / {s.non_members} non-members, "
             f"{s.epochs} epochs, defense {s.defense}{eps}; train accuracy {result.train_accuracy:.3f}, "
             f"test accuracy {result.test_accuracy:.3f}", "",
             "| attack | AUC | balanced acc. | TPR @ 1% FPR | TPR @ 0.1% FPR | seconds |", "|---|---|---|---|---|---|"]
    for o in result.outcomes:
        m = o.metrics
        lines.append(f"| {o.name} | {m.auc:.3f} | {m.balanced_accuracy:.3f} | {m.tpr_at_1pct_fpr:.3f} | "
                     f"{m.tpr_at_01pct_fpr:.3f} | {o.seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", default=[], help="run only these scenarios (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, MembershipResult] = {}
    path = RESULTS / ("membership_quick.json" if args.quick else "membership.json")
    # --only re-runs some scenarios: the others already measured stay in the file
    kept = json.loads(path.read_text())["scenarios"] if args.only and path.is_file() else {}
    start = time.perf_counter()
    for name, settings in scenarios(args.quick, args.seed).items():
        if args.only and name not in args.only:
            continue
        results[name] = run_membership(settings)
        print(table(name, results[name]) + "\n", flush=True)
        payload = {"environment": environment_info(), "seed": args.seed, "quick": args.quick,
                   "seconds": time.perf_counter() - start,
                   "scenarios": {**kept, **{name: r.to_dict() for name, r in results.items()}}}
        out = write_json(path, payload)
    print(f"wrote {out} in {payload['seconds']:.0f} s")
    if not args.quick and "overfit" in results:
        curves = {o.name: o.metrics for o in results["overfit"].outcomes}
        title = "Fashion-MNIST MLP, 500 members / 1000 non-members (overfit)"
        print("wrote", write_bytes_atomic(ROOT / "docs" / "membership_roc.png", roc_png(curves, title)))


if __name__ == "__main__":
    main()
