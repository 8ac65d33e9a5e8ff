"""Benchmark of what the server rebuilds from gradients clipped by value (``torch.nn.utils.clip_grad_value_``).

A client that calls ``clip_grad_value_(model.parameters(), bound)`` before it sends its gradient cuts every entry to
``[-bound, bound]``. A user's MLP (an ``nn.Module`` with ``x.view`` and ``F.relu``, 1024 hidden units, torch's default
initialisation) on Fashion-MNIST's train split and on two-class LFW crops (data the attacks were not tuned on); per
cell ``--seeds`` batches, batch size reported; the bounds are the ``value-clipping`` defense's strengths and none.
Per cell, for ``auto`` (``--budget`` seconds) and ``first-layer`` alone: certified samples, false certificates, sent
samples some returned input matches at 40 dB PSNR or more (near copies), the median PSNR of the matched samples.

Results go to ``benchmarks/results/value_clipping.json`` and the table to docs/benchmarks.md.

    python benchmarks/bench_value_clipping.py         # 3 batches per cell (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from bench_precision import UserMLP, score, summarise
from doc_section import write_section
from run_meta import run_meta, write_results
from torch.nn import functional as F

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "value_clipping.json"
DATA = ("fashion-mnist-train", "lfw")
BOUNDS = (None, 0.1, 0.01, 0.001)
BATCHES = (1, 4, 16)
ATTACKS = ("auto", "first-layer")


def clipped_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float | None
                     ) -> list[torch.Tensor]:
    """The client's gradient after ``clip_grad_value_``, in ``model.parameters()`` order."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if bound is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), bound)
    return [p.grad.clone() for p in model.parameters()]


def cell(data: fedleak.Dataset, bound: float | None, batch: int, seeds: int, seed: int, budget: float) -> dict:
    out = {"data": data.name, "bound": bound, "batch": batch, "samples": 0, "clipped_entries": 0.0}
    runs: dict[str, list[dict]] = {a: [] for a in ATTACKS}
    for k in range(seeds):
        torch.manual_seed(seed + k)
        model = UserMLP((1024,), math.prod(data.input_shape), data.num_classes).eval()
        x, y = data.batch(batch, seed=seed + 100 * batch + k)
        grads = clipped_gradient(model, x, y, bound)
        if bound is not None:  # the share of entries the bound cut
            out["clipped_entries"] += sum(int((g.abs() >= bound).sum()) for g in grads) / sum(g.numel() for g in grads)
        update = fedleak.read_update(model, grads, num_examples=batch)
        out["samples"] += batch
        for attack in ATTACKS:
            runs[attack].append(score(model, update, x, y, attack, budget))
    out["clipped_entries"] /= seeds
    out.update({attack: summarise(rs) for attack, rs in runs.items()})
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| data | bound | entries cut | batch | auto: certified | auto: near copies (>= 40 dB) | auto: median dB "
             "| first-layer: certified | first-layer: near copies |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, f = r["auto"], r["first-layer"]
        bound = "none" if r["bound"] is None else f"{r['bound']:g}"
        cut = "" if r["bound"] is None else f"{100 * r['clipped_entries']:.1f}%"
        lines.append(f"| {r['data']} | {bound} | {cut} | {r['batch']} | {a['certified']} / {r['samples']} | "
                     f"{a['near']} / {r['samples']} | {a['median_psnr']:.1f} | {f['certified']} / {r['samples']} | "
                     f"{f['near']} / {r['samples']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="batches per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=5.0, help="auto's time budget per attack, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' table: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        for batch in BATCHES:
            for bound in BOUNDS:
                rows.append(cell(data, bound, batch, args.seeds, args.seed, args.budget))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_value_clipping.py --seeds {args.seeds} --seed {args.seed} "
                    f"--budget {args.budget:g}", seed=args.seed, seeds=args.seeds, budget=args.budget)
    write_results(args.out, meta=meta, rows=rows)
    if args.out == RESULTS:
        false = sum(r[a]["false"] for r in rows for a in ATTACKS)
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a user's "
                "`nn.Module` MLP (`x.view`, `F.relu`, 1024 hidden units) at torch's default initialisation; "
                f"{args.seeds} batches per row, batch size reported; the client's gradient after "
                "`torch.nn.utils.clip_grad_value_(model.parameters(), bound)` (\"entries cut\": the share the bound "
                f"cut); `auto` with a {args.budget:g} s budget; \"near copies\": sent samples some returned input "
                f"matches at 40 dB PSNR or more; median dB over the matched samples. False certificates: {false}. "
                f"Command: `{meta['command']}`._\n\n{_table(rows)}")
        write_section("value-clipping", body, "Gradients clipped by value")
    print(_table(rows))


if __name__ == "__main__":
    main()
