"""Benchmark of FedAvg clients that augment every local mini-batch (random flips and padded crops).

Fashion-MNIST, fedleak's MLP 784-1024-10, full-batch SGD at rate 0.05 without momentum, 1, 2, 3 and 5 local steps,
batches of 4, 8 and 16 from ``--seeds`` seeds; the client runs no augmentation, flips only, or flips and shifts of up
to 2 pixels (``fedavg_update(..., transform=make_defense("augmentation", ...))``, a new draw per step). The server
runs ``auto`` within ``--budget`` seconds. Per row: originals rebuilt to at least 20 dB PSNR, scored against the
originals as the augmented images show them (``Augmentation.shown``); certified samples, each checked against every
image the client trained on (one not within 1e-3 of the data range of any of them is a false certificate).

Results go to ``benchmarks/results/augmentation_fedavg.json``; the table is printed (docs/weight-leakage.md keeps it).

    python benchmarks/bench_augmentation.py             # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from run_meta import run_meta

import fedleak
from fedleak.defenses import make_defense
from fedleak.report.output import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "augmentation_fedavg.json"
SETTINGS = {"none": None, "flips": {"padding": 0}, "flips and shifts of up to 2 pixels": {"padding": 2}}
STEPS, BATCHES, LR = (1, 2, 3, 5), (4, 8, 16), 0.05


def seen_images(aug, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Every image the client trained on, flattened: its augmentation's draws at each step (as ``local_training``
    seeds them), or the batch itself."""
    if aug is None:
        return x.reshape(len(x), -1)
    out = []
    for step in range(steps):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + step)
            out.append(aug(None, x, y)[0].reshape(len(x), -1))
    return torch.cat(out)


def cell(data, aug, steps: int, seeds: int, budget: float) -> dict[str, int]:
    lo, hi = data.value_range
    row = {"samples": 0, "certified": 0, "false": 0, "leaked": 0}
    for seed in range(seeds):
        for m in BATCHES:
            model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=seed)
            x, y = data.batch(m, seed=100 * seed + m)
            update = fedleak.fedavg_update(model, x, y, lr=LR, local_steps=steps, momentum=0.0, seed=seed,
                                           transform=aug)
            rec = fedleak.reconstruct(model, update, attack="auto", budget=budget, progress=False)
            seen = seen_images(aug, x, y, steps, seed)
            for j in rec.certified.nonzero().flatten().tolist():
                err = (seen - rec.inputs[j].reshape(1, -1)).abs().amax(1).min().item()
                row["false"] += int(err > 1e-3 * (hi - lo))
            shown = x if aug is None else aug.shown(x, rec.inputs)
            scores = fedleak.metrics.match(rec, shown, y, data_range=data.value_range)
            row["samples"] += m
            row["certified"] += rec.num_certified
            row["leaked"] += int(((scores.matched >= 0) & (scores.psnr >= 20)).sum())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = fedleak.load_dataset("fashion-mnist")
    rows = []
    for name, params in SETTINGS.items():
        aug = None if params is None else make_defense("augmentation", fill=float(data.value_range[0]), **params)
        for steps in STEPS:
            rows.append({"setting": name, "local_steps": steps, **cell(data, aug, steps, args.seeds, args.budget)})
            print(rows[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_augmentation.py --seeds {args.seeds} --budget {args.budget:g}",
                    data="fashion-mnist", model="MLP 784-1024-10", lr=LR, batches=BATCHES, seeds=args.seeds,
                    budget_s=args.budget)
    write_atomic(RESULTS, json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| local steps | " + " | ".join(SETTINGS) + " |")
    for steps in STEPS:
        cells = [next(r for r in rows if r["setting"] == s and r["local_steps"] == steps) for s in SETTINGS]
        print(f"| {steps} | " + " | ".join(
            f"{r['leaked']}" + (f" ({r['certified']} certified)" if r["certified"] else "") for r in cells) + " |")
    print(f"false certificates: {sum(r['false'] for r in rows)}")


if __name__ == "__main__":
    main()
