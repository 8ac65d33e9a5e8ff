"""Benchmark of the exact attack on clients that run the model's Dropout in training mode.

A model as users write it (an ``nn.Module`` with ``x.view``, ``F.relu``, ``nn.Dropout(p)`` after the hidden ReLU,
1024 hidden units, torch's default initialisation) on five data sets, batches of 8 and 16, ``--seeds`` batches
each, batch size reported. Per cell:

- **eval-mode client**: its gradient computed with ``model.eval()``: certified, and certified exact;
- **training-mode client** (``model.train()``, as training loops do; a FedAvg row: one local SGD step of
  ``fedleak.fedavg_update``, which trains in training mode): what the attack reads in eval mode only
  (``train_dropout=False``: the originals among its uncertified inputs, exactly) and with its default, which also
  reads the update as a training-mode client's: certified (none may be), inputs returned, originals rebuilt
  exactly (max abs error <= 1e-4 of the data range) and returned inputs that are none of the batch's (blends);
- the attack's time (default reading) over the client's own gradient (plain autograd, one thread), medians.

Results go to ``benchmarks/results/train_dropout.json`` and the table to ``docs/benchmarks.md``.

    python benchmarks/bench_train_dropout.py             # 3 batches per cell (about 3 minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from doc_section import write_section
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_dropout.json"
CELLS = [(d, m, 0) for d in ("mni152", "fashion-mnist", "digits", "lfw", "retina") for m in (8, 16)] + [
    ("fashion-mnist", 8, 1), ("mni152", 8, 1)]  # (data, batch, FedAvg local steps; 0: a gradient)
FEDAVG_LR = 0.1


class UserNet(nn.Module):
    def __init__(self, d: int, width: int, classes: int, p: float):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d, width), nn.Dropout(p), nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x.view(x.size(0), -1)))))


def _exactly(rec, x, y, data) -> tuple[int, int]:
    """Originals rebuilt exactly (each once), and returned inputs within the tolerance of none of them."""
    if len(rec) == 0:
        return 0, 0
    lo, hi = data.value_range
    tol = 1e-4 * (hi - lo)
    err = torch.cdist(rec.inputs.reshape(len(rec), -1).double(), x.reshape(len(x), -1).double(), p=float("inf"))
    near = err <= tol
    return int(near.any(0).sum()), int((~near.any(1)).sum())


def _gradient_ms(model, x, y, repeats: int = 5) -> float:
    params = list(model.parameters())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def cell(data, m: int, steps: int, seeds: int, seed: int, p: float) -> dict:
    row = {"data": data.name, "batch": m, "local_steps": steps, "batches": seeds, "p": p}
    keys = ("eval_certified", "eval_exact", "plain_exact", "certified", "returned", "exact", "blends", "false")
    row.update(dict.fromkeys(keys, 0))
    ratios = []
    for k in range(seeds):
        torch.manual_seed(seed * 1000 + k)
        model = UserNet(data.x[0].numel(), 1024, data.num_classes, p)
        x, y = data.batch(m, seed=seed * 1000 + k)
        if steps:
            update = fedleak.fedavg_update(model, x, y, lr=FEDAVG_LR, local_steps=steps)
        else:
            ev = fedleak.reconstruct(model.eval(), fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
            s = fedleak.metrics.match(ev, x, y, data_range=data.value_range)
            row["eval_certified"] += ev.num_certified
            row["eval_exact"] += int(s.recovered.sum())
            row["false"] += int(s.false_certificates)
            torch.manual_seed(seed * 1000 + k)
            update = fedleak.compute_gradient_update(model.train(), x, y)
        model.eval()
        plain = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=False)
        row["plain_exact"] += _exactly(plain, x, y, data)[0]
        t = time.perf_counter()
        rec = fedleak.reconstruct(model, update, attack="exclusivity")
        attack_ms = 1e3 * (time.perf_counter() - t)
        exact, blends = _exactly(rec, x, y, data)
        row["certified"] += rec.num_certified
        row["false"] += int(fedleak.metrics.match(rec, x, y, data_range=data.value_range).false_certificates)
        row["returned"] += len(rec)
        row["exact"] += exact
        row["blends"] += blends
        if not steps:
            ratios.append(attack_ms / _gradient_ms(model.train(), x, y))
            model.eval()
    row["attack_over_gradient"] = statistics.median(ratios) if ratios else None
    print(row, flush=True)
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| data | client | batch | eval-mode client: certified (exact) | training-mode client: certified | "
             "read in eval mode only: exact | default reading: returned, exact (of the batch), blends | "
             "attack / gradient |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        client = f"FedAvg, {r['local_steps']} step, lr {FEDAVG_LR:g}" if r["local_steps"] else "gradient"
        ev = f"{r['eval_certified']} ({r['eval_exact']}) / {n}" if not r["local_steps"] else "-"
        ratio = f"{r['attack_over_gradient']:.0f}x" if r["attack_over_gradient"] is not None else "-"
        lines.append(f"| {r['data']} | {client} | {r['batch']} | {ev} | {r['certified']} / {n} | "
                     f"{r['plain_exact']} / {n} | {r['returned']}, {r['exact']} / {n}, {r['blends']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="batches per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p", type=float, default=0.2, help="the Dropout's rate")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = {}
    rows = []
    for name, m, steps in CELLS:
        data = loaded.setdefault(name, fedleak.load_dataset(name))
        rows.append(cell(data, m, steps, args.seeds, args.seed, args.p))
    meta = run_meta(f"python benchmarks/bench_train_dropout.py --seeds {args.seeds} --seed {args.seed} "
                    f"--p {args.p:g}", seed=args.seed, seeds=args.seeds, p=args.p)
    write_results(RESULTS, meta=meta, rows=rows)
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a user's "
            f"`nn.Module` (`x.view`, `F.relu`, `nn.Dropout({args.p:g})` after the hidden ReLU, 1024 hidden units, "
            f"torch's default initialisation), {args.seeds} batches per row, batch size reported; \"exact\": max abs "
            "error <= 1e-4 of the data range, each original counted once; \"blends\": returned inputs that are "
            "none of the batch's (MNI152 holds identical slices, 366 distinct of 433: one input can be exact for "
            "two); \"attack / gradient\": the median ratio of the attack's time (default reading) "
            f"to the client's own gradient. False certificates: {sum(r['false'] for r in rows)}. Command: "
            f"`{meta['command']}`._\n\n"
            f"{_table(rows)}")
    write_section("train-dropout", body, "Clients that run Dropout in training mode")
    print(_table(rows))


if __name__ == "__main__":
    main()
