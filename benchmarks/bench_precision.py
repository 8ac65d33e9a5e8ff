"""Benchmark of what the server rebuilds from updates in a coarser format than float32.

A client may send its gradient in half precision (``float16`` or ``bfloat16``: half the bytes) or compute it under
mixed precision (``torch.autocast``, here on the CPU in ``bfloat16``: float32 tensors of bfloat16 products). A
user's MLP (an ``nn.Module`` with ``x.view`` and ``F.relu``; one or two hidden layers of 1024 units, torch's default
initialisation) on Fashion-MNIST's train split; per cell, ``--seeds`` batches, batch size reported. Per cell:

- ``auto`` (``--budget`` seconds): certified samples, false certificates, sent samples some returned input matches
  at 40 dB PSNR or more (near copies), the median PSNR of the matched samples, seconds;
- the same for ``first-layer`` alone (no optimisation).

Results go to ``benchmarks/results/precision.json`` and the table to docs/benchmarks.md.

    python benchmarks/bench_precision.py              # 3 batches per cell (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from doc_section import write_section
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"
FORMATS = ("float32", "float16", "bfloat16", "autocast")
DEPTHS = ((1024,), (1024, 1024))
BATCHES = (1, 4, 16)


class UserMLP(nn.Module):
    def __init__(self, hidden: tuple[int, ...], in_features: int = 784, classes: int = 10):
        super().__init__()
        dims = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], classes)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def client_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fmt: str) -> list[torch.Tensor]:
    """What the client sends, in ``model.parameters()`` order."""
    if fmt == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    else:
        logits = model(x)
    grads = torch.autograd.grad(F.cross_entropy(logits.float(), y), list(model.parameters()))
    return [g.to(getattr(torch, fmt)) if fmt in ("float16", "bfloat16") else g for g in grads]


def score(model, update, x, y, attack: str, budget: float) -> dict:
    start = time.perf_counter()
    extra = {"budget": budget, "progress": False} if attack == "auto" else {}
    rec = fedleak.reconstruct(model, update, attack=attack, input_shape=tuple(x.shape[1:]), **extra)
    seconds = time.perf_counter() - start
    m = fedleak.metrics.match(rec, x, y)
    psnr = np.where(m.matched >= 0, np.nan_to_num(np.asarray(m.psnr, dtype=float), nan=0.0), 0.0)
    return {"certified": int(rec.num_certified), "false": int(m.false_certificate.sum()),
            "near": int((psnr >= 40).sum()), "psnr": [float(v) for v in psnr], "seconds": seconds}


def cell(data: fedleak.Dataset, hidden: tuple[int, ...], fmt: str, batch: int, seeds: int, seed: int,
         budget: float) -> dict:
    out = {"hidden": list(hidden), "format": fmt, "batch": batch, "samples": 0}
    runs: dict[str, list[dict]] = {"auto": [], "first-layer": []}
    for k in range(seeds):
        torch.manual_seed(seed + k)
        model = UserMLP(hidden).eval()
        x, y = data.batch(batch, seed=seed + 100 * batch + k)
        update = fedleak.read_update(model, client_gradient(model, x, y, fmt), num_examples=batch)
        out["samples"] += batch
        for attack in runs:
            runs[attack].append(score(model, update, x, y, attack, budget))
    out.update({attack: summarise(rs) for attack, rs in runs.items()})
    return out


def summarise(runs: list[dict]) -> dict:
    """One attack's :func:`score` over a cell's batches: counts summed, the matched samples' median PSNR, the median
    seconds."""
    psnr = [p for r in runs for p in r["psnr"] if p > 0]
    return {"certified": sum(r["certified"] for r in runs), "false": sum(r["false"] for r in runs),
            "near": sum(r["near"] for r in runs), "median_psnr": float(np.median(psnr)) if psnr else 0.0,
            "seconds": float(np.median([r["seconds"] for r in runs]))}


def _table(rows: list[dict]) -> str:
    lines = ["| hidden | format | batch | auto: certified | auto: near copies (>= 40 dB) | auto: median dB | auto s "
             "| first-layer: near copies | first-layer: median dB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, f = r["auto"], r["first-layer"]
        lines.append(f"| {', '.join(map(str, r['hidden']))} | {r['format']} | {r['batch']} | {a['certified']} / "
                     f"{r['samples']} | {a['near']} / {r['samples']} | {a['median_psnr']:.1f} | {a['seconds']:.2f} | "
                     f"{f['near']} / {r['samples']} | {f['median_psnr']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="batches per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=5.0, help="auto's time budget per attack, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' table: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = fedleak.load_dataset("fashion-mnist-train")
    rows = []
    for hidden in DEPTHS:
        for batch in BATCHES:
            for fmt in FORMATS:
                rows.append(cell(data, hidden, fmt, batch, args.seeds, args.seed, args.budget))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_precision.py --seeds {args.seeds} --seed {args.seed} "
                    f"--budget {args.budget:g}", seed=args.seed, seeds=args.seeds, budget=args.budget)
    write_results(args.out, meta=meta, rows=rows)
    if args.out == RESULTS:
        false = sum(r[a]["false"] for r in rows for a in ("auto", "first-layer"))
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a user's "
                "`nn.Module` MLP (`x.view`, `F.relu`) at torch's default initialisation, Fashion-MNIST's train split, "
                f"{args.seeds} batches per row, batch size reported; the client's gradient in float32, sent in "
                "float16 or bfloat16, or computed under `torch.autocast` (CPU, bfloat16); `auto` with a "
                f"{args.budget:g} s budget; \"near copies\": sent samples some returned input matches at 40 dB PSNR "
                f"or more; median dB over the matched samples. False certificates: {false}. "
                f"Command: `{meta['command']}`._\n\n{_table(rows)}")
        write_section("precision", body, "Updates in half precision or mixed precision")
    print(_table(rows))


if __name__ == "__main__":
    main()
