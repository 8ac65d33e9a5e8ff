"""Benchmark of fishing on trained models: a user's MLP (an ``nn.Module`` with ``x.view`` and ``F.relu``, 1024 hidden
units) trained on the data set its batches come from (SGD, batch 64, learning rate 0.1, momentum 0.9) for ``--steps``
steps, then ``--batches`` batches of 32 of that data fished with the defaults and attacked from the client's gradient.

Per row: samples that meet the exclusivity condition after fishing ("fished"), samples certified and exact against the
sent batch, false certificates, samples the model classifies with probability 1 in float32 ("saturated": their loss
vector has no negative entry, so no gradient row reads them), the fished samples' mean PSNR against the originals,
kappa (the targets' margin in the layer's units) and fishing's median seconds. A trained model's pre-activations are
larger than at initialisation, so this checks the margin's scale where fishing was not tuned.

Results go to ``benchmarks/results/fishing_trained.json`` and the table to docs/benchmarks.md.

    python benchmarks/bench_fishing_trained.py        # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from bench_reduction import trained
from doc_section import write_section
from run_meta import run_meta, write_results

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "fishing_trained.json"
CELLS = [("lfw", 300), ("lfw", 1000), ("fashion-mnist", 300), ("fashion-mnist", 1000), ("digits", 300)]
BATCH = 32


def cell(data: fedleak.Dataset, steps: int, batches: int, seed: int) -> dict:
    model = trained(data, steps, seed)
    row = dict(data=data.name, steps=steps, batch=BATCH, batches=batches, fished=0, certified=0, false=0, saturated=0,
               psnr=[], kappa=[], seconds=[])
    for k in range(batches):
        x, y = data.batch(BATCH, seed=seed + 70 + k)
        t0 = time.perf_counter()
        res = fedleak.fish(model, x, y)
        row["seconds"].append(time.perf_counter() - t0)
        row["fished"] += int(res.certifiable_after.sum())
        row["saturated"] += sum(s.status == "saturated" for s in res.samples)
        row["psnr"] += [s.psnr for s in res.samples if s.status == "fished"]
        row["kappa"].append(getattr(res, "kappa", res.options.margin))  # (a version whose margin was absolute)
        rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, res.inputs, y))
        scores = fedleak.metrics.match(rec, res.inputs, y, data_range=data.value_range)
        row["certified"] += int(scores.recovered.sum())
        row["false"] += scores.false_certificates
    row["psnr_mean"] = float(np.mean(row.pop("psnr"))) if row["fished"] else None
    row["kappa_median"] = float(np.median(row.pop("kappa")))
    row["seconds_median"] = float(np.median(row.pop("seconds")))
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| data | SGD steps | fished | certified and exact | false cert. | saturated | PSNR fished (mean) | "
             "kappa | fish s (median) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        psnr = f"{r['psnr_mean']:.1f} dB" if r["psnr_mean"] is not None else "-"
        lines.append(f"| {r['data']} | {r['steps']} | {r['fished']} / {n} | {r['certified']} / {n} | {r['false']} | "
                     f"{r['saturated']} | {psnr} | {r['kappa_median']:.3g} | {r['seconds_median']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3, help="batches per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' table: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded: dict[str, fedleak.Dataset] = {}
    rows = []
    for name, steps in CELLS:
        rows.append(cell(loaded.setdefault(name, fedleak.load_dataset(name)), steps, args.batches, args.seed))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_fishing_trained.py --batches {args.batches} --seed {args.seed}",
                    seed=args.seed, batches=args.batches)
    write_results(args.out, meta=meta, rows=rows)
    if args.out == RESULTS:
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a user's "
                "`nn.Module` (`x.view`, `F.relu`, 1024 hidden units) trained on the data set its batches come from "
                f"(SGD, batch 64, lr 0.1, momentum 0.9); {args.batches} batches of {BATCH} per row, fished with "
                "`fedleak.fish`'s defaults and attacked from the client's gradient; \"saturated\": samples the model "
                "classifies with probability 1 in float32, whose gradient rows the attack cannot read. Command: "
                f"`{meta['command']}`._\n\n{_table(rows)}")
        write_section("fishing-trained", body, "Fishing trained models")
    print(_table(rows))


if __name__ == "__main__":
    main()
