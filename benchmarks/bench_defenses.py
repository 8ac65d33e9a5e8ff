"""Every registered defense at its listed strengths (and a few combinations) against the exact attack and
Inverting Gradients, with the utility, cost and ε each takes: the table of docs/defenses.md.

    .venv/bin/python benchmarks/bench_defenses.py --model mlp --rounds 50      # every defense, its strengths
    .venv/bin/python benchmarks/bench_defenses.py --model cnn --rounds 30 --trials 1 --attack-batch 2 \
        --iterations 150 --defense clipping --defense top-k ...                   # a chosen grid

The tables of docs/defenses.md were made with the defense list (each name at its listed strengths): clipping,
disguisednets, dp-sgd, gaussian-noise, gradient-pruning, instahide, laplace-noise, mixup, qsgd, quantize, sign,
top-k, local-dp, central-dp, the combinations below, and on the MLP soteria:ratio=0.5 (Soteria costs about 230x
the gradient per update on the MLP and 90x on the CNN, so one strength on the MLP only).

Runs ``fedleak.evaluate``; finished cells are kept in ``benchmarks/results/defenses/<model>/cells.jsonl`` so an
interrupted run resumes. The results (versions, seed, settings, every cell) go to
``benchmarks/results/defenses_<model>.json``; the markdown table is printed. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from fedleak.defenses import defense_classes
from fedleak.evaluation import EvaluationSettings, evaluate, write_evaluation

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Fashion-MNIST models: MLP 784-1024-10; CNN two 3x3 conv + ReLU blocks (6, 16 channels, padding 1), FC 128, 10
MODELS = {"mlp": {"widths": (1024,), "conv": ()}, "cnn": {"widths": (128,), "conv": (6, 16)}}
# combinations the literature argues about: clipping + noise (DP-FedAvg), sparsification + quantisation
COMBINATIONS = ("clipping:bound=1.0 + gaussian-noise:sigma=0.1", "top-k:ratio=0.1 + quantize:bits=8",
                "top-k:ratio=0.1 + gaussian-noise:sigma=0.01")
SLOW = ("exclusivity-reduction",)  # LPs on every batch of every round: --all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="mlp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--attack-batch", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--all", action="store_true", help="also the slow defenses " + ", ".join(SLOW))
    ap.add_argument("--defense", action="append", help="a defense spec to evaluate (repeatable); default: every "
                                                      "registered defense at its listed strengths, and combinations")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [c.name for c in defense_classes() if args.all or c.name not in SLOW]
    specs = tuple(args.defense) if args.defense else tuple(names) + COMBINATIONS
    settings = EvaluationSettings(
        data="fashion-mnist-train", test_data="fashion-mnist", test_size=2000, **MODELS[args.model],
        defenses=specs, attacks=("exclusivity", "ig"),
        attack_batch=args.attack_batch, trials=args.trials, attack_iterations=args.iterations, rounds=args.rounds,
        clients=4, client_size=500, batch_size=32, lr=0.1, seed=args.seed)
    work = RESULTS / "defenses" / args.model
    ev = evaluate(settings, out=work, progress=None)
    write_evaluation(ev, work)
    target = RESULTS / f"defenses_{args.model}.json"
    shutil.copyfile(work / "results.json", target)
    print("| defense | exact attack: leaked (certified) | IG: leaked | IG PSNR dB | labels | accuracy | "
          "client time x | bytes x | ε |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ev.rows:
        ex = next(c for c in r.leakage if c.attack == "exclusivity")
        ig = max((c for c in r.leakage if c.attack.startswith("ig")), key=lambda c: (c.leaked, c.psnr))
        how = " (aware)" if ig.defense_aware else ""
        eps = "" if r.utility.epsilon is None else f"{r.utility.epsilon:.3g}"
        print(f"| {r.defense} | {ex.leaked_fraction:.0%} ({ex.recovered}/{ex.samples}) | {ig.leaked_fraction:.0%}{how} "
              f"| {ig.psnr:.1f} | {r.best.label_accuracy:.0%} | {r.utility.accuracy:.1%} | {r.time_ratio:.1f} | "
              f"{r.bytes_ratio:.3f} | {eps} |")
    print(f"Pareto front: {', '.join(ev.pareto)}; {ev.seconds:.0f} s ({ev.resumed} cells resumed)")
    print(json.dumps({"results": str(target.relative_to(ROOT))}))


if __name__ == "__main__":
    main()
