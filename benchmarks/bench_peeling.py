"""Peeling: what the exclusivity attack certifies in one reading of a FedSGD gradient and after peeling it, against
the analysis's count of each (the update as sent; the peeling closure), on natural batches of built-in data sets, with
the attack's time as a multiple of the client's plain-autograd gradient, measured in the same run.

    python benchmarks/bench_peeling.py [--seeds 4] [--batches 8,16,32,64] [--widths 256,1024]

Writes benchmarks/results/peeling.json and the table in docs/benchmarks.md (section ``peeling``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from doc_section import write_section
from run_meta import machine, run_meta, write_results

import fedleak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "peeling.json"
DATA = ("fashion-mnist", "lfw", "digits", "mni152")


def gradient_seconds(model, x, y, repeats: int = 5) -> float:
    """The client's gradient by plain autograd, the best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        best = min(best, time.perf_counter() - start)
    return best


def cell(data: fedleak.Dataset, width: int, batch: int, seeds: int) -> dict[str, object]:
    row = {"data": data.name, "width": width, "batch": batch, "samples": 0, "first_count": 0, "closure": 0,
           "once": 0, "peeled": 0, "false": 0, "once_x": [], "peeled_x": []}
    for seed in range(seeds):
        model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=seed)
        x, y = data.batch(batch, seed=100 * seed + batch)
        update = fedleak.compute_gradient_update(model, x, y)
        report = fedleak.analyze_exclusivity(model, x, y)
        grad = gradient_seconds(model, x, y)
        once = fedleak.reconstruct(model, update, peel=False)
        peeled = fedleak.reconstruct(model, update)
        row["samples"] += batch
        row["first_count"] += int(report.head_certifiable.sum())
        row["closure"] += int(report.certifiable.sum())
        row["once"] += once.num_certified
        row["peeled"] += peeled.num_certified
        row["false"] += fedleak.metrics.match(peeled, x, y, data_range=data.value_range).false_certificates
        row["once_x"].append(once.seconds / grad)
        row["peeled_x"].append(peeled.seconds / grad)
    for key in ("once_x", "peeled_x"):
        values = sorted(row[key])
        row[key] = values[len(values) // 2]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--widths", default="256,1024")
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    start = time.time()
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        for width in widths:
            for batch in batches:
                rows.append(cell(data, width, batch, args.seeds))
                print(rows[-1], flush=True)
    command = (f"python benchmarks/bench_peeling.py --seeds {args.seeds} --batches {args.batches} "
               f"--widths {args.widths}")
    write_results(RESULTS, meta=run_meta(command, seeds=args.seeds, batches=batches, widths=widths), rows=rows)
    lines = ["| data | width | batch | samples | analysis: as sent | certified, one reading | analysis: peeled | "
             "certified, peeled | false certificates | attack / gradient, one reading | peeled |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['width']} | {r['batch']} | {r['samples']} | {r['first_count']} "
                     f"| {r['once']} | {r['closure']} | {r['peeled']} | {r['false']} | {r['once_x']:.0f}x "
                     f"| {r['peeled_x']:.0f}x |")
    body = (f"_MLPs `make_mlp(shape, [width], classes, seed=s)` at PyTorch's default initialisation, {args.seeds} "
            f"seeds per row, natural batches drawn by seed; the FedSGD gradient with its batch size reported; times "
            f"are medians over the seeds of the attack's seconds over the client's plain-autograd gradient (best of "
            f"5), one thread, {machine()}; {time.time() - start:.0f} s; command `{command}`._\n\n" + "\n".join(lines))
    write_section("peeling", body, "Peeling")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
