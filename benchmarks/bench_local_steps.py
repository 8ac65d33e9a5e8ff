"""Benchmark of reading FedAvg weight changes of several local steps off the first Linear layer's rows.

Over several local steps a client's gradients are taken at moving weights, so its weight change is not a scaled
gradient and no sample can be certified from it; but its input stays the same, so a unit that fired for one sample
only still moved its row by a multiple of that sample's input (:mod:`fedleak.attacks.first_layer_rows`). Models
as users write them (torch's default initialisation): an MLP with ``x.view`` and ``F.relu`` (1024 hidden), the same
with ``nn.Dropout(0.2)`` after the ReLU (the client trains in training mode, as ``fedleak.fedavg_update`` does),
and a residual MLP with LayerNorm before its logits (512 hidden; the exclusivity attack cannot read it). Clients:
``fedleak.fedavg_update`` with plain SGD, momentum SGD with weight decay, and one epoch of mini-batches; the number
of local steps is not declared to the attack. Per cell (``--batches`` batches, batch size reported):

- **exclusivity**: what the exact route certified, and the originals among the inputs it returned (exactly);
- **first-layer rows**: inputs returned, originals rebuilt exactly (max abs error <= 1e-4 of the data range, each
  counted once), their labels right, returned inputs that are none of the batch's, the attack's median time.

Then ``auto`` on undeclared one-step updates, declared 3-step updates and undeclared local epochs of mini-batches,
against DLM+ searching the whole batch within the same budget. Results go
to ``benchmarks/results/local_steps.json`` and the tables to ``docs/benchmarks.md``.

    python benchmarks/bench_local_steps.py            # 3 batches per cell (about 13 minutes)
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
RESULTS = ROOT / "benchmarks" / "results" / "local_steps.json"
CLIENTS = {  # name: fedleak.fedavg_update's keywords
    "1 step, lr 0.05": {"lr": 0.05, "local_steps": 1},
    "3 steps, lr 0.05": {"lr": 0.05, "local_steps": 3},
    "5 steps, lr 0.1": {"lr": 0.1, "local_steps": 5},
    "3 steps, lr 0.05, momentum 0.9, decay 5e-4": {"lr": 0.05, "local_steps": 3, "optimizer": "momentum",
                                                    "weight_decay": 5e-4},
    "1 epoch of mini-batches of 4, lr 0.05": {"lr": 0.05, "local_steps": None, "batch_size": 4},
}
DATA = ("fashion-mnist", "digits", "mni152", "lfw")
MODELS = ("mlp", "mlp+dropout", "residual+layernorm")


class UserNet(nn.Module):
    """A user's MLP: ``x.view``, ``F.relu``, optionally Dropout after the ReLU."""

    def __init__(self, d: int, classes: int, p: float = 0.0, width: int = 1024):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d, width), nn.Dropout(p), nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x.view(x.size(0), -1)))))


class ResidualNet(nn.Module):
    """A ReLU layer, a residual block and a LayerNorm before the logits."""

    def __init__(self, d: int, classes: int, width: int = 512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, width)
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        return self.out(self.norm(h + F.relu(self.fc2(h))))


def make(kind: str, data) -> nn.Module:
    d, k = data.x[0].numel(), data.num_classes
    return {"mlp": lambda: UserNet(d, k), "mlp+dropout": lambda: UserNet(d, k, 0.2),
            "residual+layernorm": lambda: ResidualNet(d, k)}[kind]()


def exactly(rec, x, y, data) -> tuple[int, int, int]:
    """Originals rebuilt exactly (each once), those with their label, returned inputs that are none of them."""
    if len(rec) == 0:
        return 0, 0, 0
    lo, hi = data.value_range
    err = torch.cdist(rec.inputs.reshape(len(rec), -1).double(), x.reshape(len(x), -1).double(), p=float("inf"))
    near = err <= 1e-4 * (hi - lo)
    labelled = near & (rec.labels[:, None] == y[None, :])
    return int(near.any(0).sum()), int(labelled.any(0).sum()), int((~near.any(1)).sum())


def client(model, x, y, settings: dict, seed: int) -> fedleak.WeightUpdate:
    kw = dict(settings)
    if kw["local_steps"] is None:  # one epoch
        kw["local_steps"] = -(-len(x) // kw["batch_size"])
    return fedleak.fedavg_update(model, x, y, seed=seed, **kw)


def cell(data, kind: str, name: str, m: int, batches: int, seed: int) -> dict:
    row = {"data": data.name, "model": kind, "client": name, "batch": m, "batches": batches}
    keys = ("certified", "false", "exact_route_exact", "exact_route_blends", "returned", "exact", "labelled", "blends")
    row.update(dict.fromkeys(keys, 0))
    times = []
    readable = kind != "residual+layernorm"
    for k in range(batches):
        s = seed * 1000 + k
        torch.manual_seed(s)
        model = make(kind, data)
        x, y = data.batch(m, seed=s)
        update = client(model, x, y, CLIENTS[name], s)
        model.eval()
        if readable:
            ex = fedleak.reconstruct(model, update, attack="exclusivity")
            row["certified"] += ex.num_certified
            row["false"] += int(fedleak.metrics.match(ex, x, y, data_range=data.value_range).false_certificates)
            got, _, off = exactly(ex, x, y, data)
            row["exact_route_exact"] += got
            row["exact_route_blends"] += off
        t = time.perf_counter()
        rec = fedleak.reconstruct(model, update, attack="first-layer")
        times.append(1e3 * (time.perf_counter() - t))
        exact, labelled, blends = exactly(rec, x, y, data)
        row["returned"] += len(rec)
        row["exact"] += exact
        row["labelled"] += labelled
        row["blends"] += blends
    if not readable:
        row["certified"] = row["false"] = row["exact_route_exact"] = row["exact_route_blends"] = None
    row["ms"] = statistics.median(times)
    print(row, flush=True)
    return row


AUTO_CLIENTS = {  # name: fedleak.fedavg_update's keywords, for the auto table
    "1 step, lr 0.1, not declared": {"lr": 0.1, "local_steps": 1},
    "3 steps, lr 0.05, declared": {"lr": 0.05, "local_steps": 3, "reveal_local_steps": True},
    "1 epoch of mini-batches of 4, lr 0.05, not declared": {"lr": 0.05, "local_steps": 4, "batch_size": 4},
}


def auto_cell(data, client_name: str, m: int, batches: int, seed: int, budget: float) -> dict:
    """``auto`` against DLM+ searching the whole batch, the same budget: exact originals and certified samples."""
    row = {"data": data.name, "client": client_name, "batch": m, "batches": batches, "budget": budget}
    for name in ("auto", "dlm+"):
        exact, certified, psnr = 0, 0, []
        for k in range(batches):
            s = seed * 1000 + k
            torch.manual_seed(s)
            model = UserNet(data.x[0].numel(), data.num_classes)
            x, y = data.batch(m, seed=s)
            update = fedleak.fedavg_update(model, x, y, seed=s, **AUTO_CLIENTS[client_name])
            opts = {"budget": budget, "progress": False} if name == "auto" else {"time_budget": budget}
            rec = fedleak.reconstruct(model.eval(), update, attack=name, seed=s, **opts)
            exact += exactly(rec, x, y, data)[0]
            certified += rec.num_certified
            psnr.extend(float(v) for v in fedleak.metrics.match(rec, x, y, data_range=data.value_range).psnr)
        row[name] = {"exact": exact, "certified": certified, "median_psnr": statistics.median(psnr)}
    print(row, flush=True)
    return row


def _table(rows: list[dict]) -> str:
    """One line per data set, model and client; batches of 8 and 32 side by side ("8 / 32")."""
    lines = ["| data | model | client (steps not declared) | exclusivity: certified; exact (of the batch); not in "
             "the batch | first-layer rows: exact (of the batch); with label; not in the batch | ms |",
             "|---|---|---|---|---|---:|"]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["data"], r["model"], r["client"]), []).append(r)
    for (data, model, client_name), pair in cells.items():
        def both(key: str, of: bool = False) -> str:
            return " / ".join("-" if r[key] is None else f"{r[key]}" + (f" of {r['batch'] * r['batches']}" if of
                                                                         else "") for r in pair)
        ex = ("refused" if pair[0]["certified"] is None else
              f"{both('certified')}; {both('exact_route_exact', True)}; {both('exact_route_blends')}")
        ms = max(r["ms"] for r in pair)
        lines.append(f"| {data} | {model} | {client_name} | {ex} | {both('exact', True)}; {both('labelled')}; "
                     f"{both('blends')} | {ms:.0f} |")
    return "\n".join(lines)


def _auto_table(rows: list[dict]) -> str:
    lines = ["| data | client | batch | budget | auto: exact (certified), median PSNR | "
             "DLM+ searching the whole batch: exact, median PSNR |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        a, d = r["auto"], r["dlm+"]
        lines.append(f"| {r['data']} | {r['client']} | {r['batch']} | {r['budget']:g} s | {a['exact']} / {n} "
                     f"({a['certified']}), {a['median_psnr']:.1f} dB | {d['exact']} / {n}, "
                     f"{d['median_psnr']:.1f} dB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=3, help="batches per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=20.0, help="auto's and DLM+'s seconds per update")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, autos = [], []
    for name in DATA:
        data = fedleak.load_dataset(name)
        for kind in MODELS:
            for client_name in CLIENTS:
                for m in (8, 32):
                    rows.append(cell(data, kind, client_name, m, args.batches, args.seed))
        if name in ("fashion-mnist", "digits"):
            autos.extend(auto_cell(data, c, 16, 2, args.seed, args.budget) for c in AUTO_CLIENTS)
    meta = run_meta(f"python benchmarks/bench_local_steps.py --batches {args.batches} --seed {args.seed} "
                    f"--budget {args.budget:g}", seed=args.seed, batches=args.batches, budget=args.budget,
                    clients=CLIENTS)
    write_results(RESULTS, meta=meta, rows=rows, auto=autos)
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; clients "
            "`fedleak.fedavg_update` (training mode), the number of local steps not declared, batch size reported; "
            f"{args.batches} batches of 8 and of 32 per row (\"8 / 32\"); \"exact\": max abs error <= 1e-4 of the "
            "data range, each original counted once; \"not in the batch\": returned inputs within that of none of "
            "the batch's (MNI152 holds identical and near-identical neighbouring slices, whose blends agree on rows as "
            "a sample's do); \"exclusivity\": `attack=\"exclusivity\"` with its defaults, which also returns "
            "candidates beyond the batch size; \"ms\": the first-layer reading's median time, the larger of the two "
            f"batch sizes'. False certificates: {sum(r['false'] or 0 for r in rows)}. Command: "
            f"`{meta['command']}`._\n\n{_table(rows)}\n\n"
            "`auto` on updates of the MLP, 2 batches of 16 per row:\n\n"
            f"{_auto_table(autos)}")
    write_section("local-steps", body, "Several local steps: the first layer's rows")
    print(_table(rows))
    print(_auto_table(autos))


if __name__ == "__main__":
    main()
