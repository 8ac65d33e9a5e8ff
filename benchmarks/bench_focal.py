"""Benchmark of the exclusivity attack on clients that train with a focal loss.

Default-initialised MLPs on four data sets; per batch, the same inputs sent by three clients: one training with the
cross-entropy (the reference), and one with the focal loss ``-(1 - p_y)^γ log p_y`` (γ cycling through
``--gammas``, one per batch), the latter read as a cross-entropy client's (``focal_gamma`` not told) and with its
exponent told. Gradients with the batch size reported, and FedAvg updates of one local SGD step (the learning rate
not told). Per cell: certified samples, false certificates (each certified input within the certificate's claim of
an original, with its label) and originals rebuilt exactly (max abs error <= 1e-4 of the data range).

Results go to ``benchmarks/results/focal.json`` and the table to ``docs/benchmarks.md``.

    python benchmarks/bench_focal.py            # 12 batches per cell (about 2 minutes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from doc_section import write_section
from run_meta import run_meta, write_results

import fedleak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "focal.json"
# (data, hidden widths, batch, FedAvg learning rate; 0: a gradient)
CELLS = (("fashion-mnist", (1024,), 16, 0.0), ("fashion-mnist", (1024,), 64, 0.0), ("digits", (256,), 8, 0.0),
         ("lfw", (1024,), 16, 0.0), ("lfw", (512, 256), 8, 0.0), ("retina", (512,), 8, 0.0),
         ("fashion-mnist", (1024,), 8, 1.0), ("fashion-mnist", (1024,), 8, 0.1), ("lfw", (1024,), 8, 1.0))
READINGS = ("cross-entropy client", "focal client, not told", "focal client, told")


def _update(model, x, y, lr: float, gamma: float):
    if lr:
        return fedleak.fedavg_update(model, x, y, lr=lr, focal_gamma=gamma)
    return fedleak.compute_gradient_update(model, x, y, focal_gamma=gamma)


def cell(data, widths: tuple[int, ...], m: int, lr: float, batches: int, gammas: tuple[float, ...],
         seed: int) -> dict:
    row = {"data": data.name, "widths": list(widths), "batch": m, "lr": lr, "batches": batches}
    counts = {r: {"certified": 0, "false": 0, "exact": 0} for r in READINGS}
    for k in range(batches):
        s = seed * 1000 + k
        gamma = gammas[k % len(gammas)]
        model = fedleak.make_mlp(data.input_shape, list(widths), data.num_classes, seed=s)
        x, y = data.batch(m, seed=s)
        focal = _update(model, x, y, lr, gamma)
        sent = {READINGS[0]: (_update(model, x, y, lr, 0.0), 0.0), READINGS[1]: (focal, 0.0),
                READINGS[2]: (focal, gamma)}
        for reading, (update, told) in sent.items():
            rec = fedleak.reconstruct(model, update, focal_gamma=told)
            score = fedleak.metrics.match(rec, x, y, data_range=data.value_range)
            counts[reading]["certified"] += rec.num_certified
            counts[reading]["false"] += int(score.false_certificates)
            counts[reading]["exact"] += int(score.exact.sum())
    row["readings"] = counts
    print(row, flush=True)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| data | MLP | update | batch | samples | " + " | ".join(f"{r}: certified (exact)" for r in READINGS)
             + " | false cert. |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        mlp = "-".join(str(w) for w in r["widths"])
        update = f"FedAvg, 1 step, lr {r['lr']:g} (not told)" if r["lr"] else "gradient"
        cells = " | ".join(f"{c['certified']} ({c['exact']})" for c in r["readings"].values())
        false = sum(c["false"] for c in r["readings"].values())
        lines.append(f"| {r['data']} | {mlp} | {update} | {r['batch']} | {n} | {cells} | {false} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=12, help="batches per cell")
    ap.add_argument("--gammas", default="0.5,1,2,5", help="the focal exponents, one per batch in turn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    gammas = tuple(float(g) for g in args.gammas.split(","))
    torch.set_num_threads(1)
    loaded: dict[str, fedleak.Dataset] = {}
    rows = [cell(loaded.setdefault(name, fedleak.load_dataset(name)), widths, m, lr, args.batches, gammas, args.seed)
            for name, widths, m, lr in CELLS]
    meta = run_meta(f"python benchmarks/bench_focal.py --batches {args.batches} --gammas {args.gammas} "
                    f"--seed {args.seed}", seed=args.seed, batches=args.batches, gammas=list(gammas))
    write_results(RESULTS, meta=meta, rows=rows)
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; "
            f"default-initialised MLPs, {args.batches} batches per row, γ = {args.gammas} in turn, seed {args.seed}; "
            "every batch sent by a cross-entropy client and by a focal client, the latter read without and with "
            "`focal_gamma`; gradients with the batch size reported; \"exact\": originals within 1e-4 of the data "
            f"range. Command: `{meta['command']}`._\n\n" + _table(rows))
    write_section("focal", body, "Focal-loss clients")


if __name__ == "__main__":
    main()
