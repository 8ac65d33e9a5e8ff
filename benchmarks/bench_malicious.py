"""The malicious servers' attacks on one update each: trap weights, imprint bins and class fishing, per batch size, on
a ten-class and a two-class data set.

    python benchmarks/bench_malicious.py [--batches 16,64,100,256] [--repeats 5] [--seed 0] [--no-doc]
    python benchmarks/bench_malicious.py --rate-untold --attacks trap-weights,imprint   # the rate not told

Every cell: ``--repeats`` random batches, a one-step FedAvg update (``before - after`` of float32 weights, lr 0.1,
the number of examples reported) of a seeded MLP with one hidden layer of 1000 units whose first layer the server
made (trap weights, scale 0.9; imprint, 1000 bins from 1000 samples the batches never draw, or a quarter of a
smaller data set) or whose output layer it made (class fishing on class 1). The server set the rate and the one
local step, and tells every attack (a vote for the batch's scale that falls on ``lr/M`` is then pinned; at an untold
rate trap weights certify only where more than half of the batch does, ``--rate-untold``). Recovered: certified
and within 1e-4 of the data's range of an original with its label (``fedleak.metrics.match``); false: certified and
not. Writes ``benchmarks/results/malicious.json`` (versions, seed, settings) and the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from doc_section import write_section

import fedleak
from fedleak.nets.blas import cpu_model
from fedleak.report.output import environment_info, write_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "malicious.json"
DATA = ("fashion-mnist", "lfw")

def public_size(data: fedleak.Dataset) -> int:
    """The imprint's quantiles come from the data set's last samples (1000, or a quarter of a smaller set), which
    no batch draws."""
    return min(1000, len(data) // 4)


THREATS = {  # attack name -> how the server makes the model it sends
    "trap-weights": lambda model, public, seed: fedleak.trap_weights(model, seed=seed, scale=0.9),
    "imprint": lambda model, public, seed: fedleak.imprint_weights(model, public.reshape(len(public), -1), bins=1000,
                                                                   seed=seed),
    "class-fishing": lambda model, public, seed: fedleak.class_fishing_weights(model, FISHED),
}
FISHED = 1  # the class the class-fishing server targets


def cell(data: fedleak.Dataset, attack: str, batch: int, repeats: int, seed: int, told: bool = True) -> dict:
    gen = np.random.default_rng(seed)
    public = public_size(data)
    model = THREATS[attack](fedleak.make_mlp(data.input_shape, [1000], data.num_classes, seed=seed),
                            data.x[-public:], seed)
    lo, hi = data.value_range
    out = dict(samples=0, fished=0, certified=0, recovered=0, false=0, seconds=0.0)
    for _ in range(repeats):
        idx = torch.as_tensor(gen.choice(len(data) - public, size=batch, replace=False))
        x, y = data.x[idx], data.y[idx]
        update = fedleak.fedavg_update(model, x, y, lr=0.1, seed=int(gen.integers(0, 2**31)))
        if told or attack == "class-fishing":  # the server set the rate and the one step, and reads the update so
            update = dataclasses.replace(update, learning_rate=0.1, local_steps=1)
        start = time.perf_counter()
        rec = fedleak.reconstruct(model, update, attack=attack)
        out["seconds"] += time.perf_counter() - start
        scores = fedleak.metrics.match(rec, x, y, data_range=(lo, hi))
        out["samples"] += batch
        out["fished"] += int((y == FISHED).sum())
        out["certified"] += scores.n_certified
        out["recovered"] += int(scores.recovered.sum())
        out["false"] += scores.false_certificates
    out["seconds"] = round(out["seconds"] / repeats, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64,100,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-doc", action="store_true", help="do not write the table into docs/benchmarks.md")
    ap.add_argument("--rate-untold", action="store_true",
                    help="do not tell trap weights and imprint the rate (results to malicious_untold.json, no doc)")
    ap.add_argument("--attacks", default=",".join(THREATS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        for attack in args.attacks.split(","):
            for b in batches:
                r = dict(data=name, classes=data.num_classes, attack=attack, batch=b,
                         **cell(data, attack, b, args.repeats, args.seed, told=not args.rate_untold))
                print(r, flush=True)
                rows.append(r)
    machine = f"{os.cpu_count()} cores of an {cpu_model()}, {platform.machine()}"
    date = datetime.date.today().isoformat()
    out = RESULTS.with_name("malicious_untold.json") if args.rate_untold else RESULTS
    write_json(out, dict(settings=vars(args), environment=environment_info(), machine=machine, date=date, rows=rows))
    lines = ["| data (classes) | attack | batch | recovered (certified, exact) | of the fished class "
             "| false certificates | attack s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fished = (f"{r['recovered']}/{r['fished']} ({100 * r['recovered'] / max(r['fished'], 1):.0f}%)"
                  if r["attack"] == "class-fishing" else "")
        lines.append(f"| {r['data']} ({r['classes']}) | {r['attack']} | {r['batch']} | {r['recovered']}/{r['samples']} "
                     f"({100 * r['recovered'] / r['samples']:.0f}%) | {fished} | {r['false']} | {r['seconds']:.2f} |")
    body = (f"_Measured {date} on {machine}, torch {torch.__version__} pinned to one thread: "
            f"`python benchmarks/bench_malicious.py --batches {args.batches} --repeats {args.repeats} --seed "
            f"{args.seed}`: MLP with 1000 hidden units, one FedAvg step at lr 0.1 (`before - after` of float32 "
            f"weights, the number of examples reported); trap weights at scale 0.9, imprint with 1000 bins from the "
            f"data set's last 1000 samples (LFW: last 100), which no batch draws; class fishing on class {FISHED}; "
            f"every attack told the rate and the one step the server set; "
            f"{args.repeats} batches per cell; results in `benchmarks/results/malicious.json`._\n\n"
            + "\n".join(lines))
    print("\n".join(lines))
    if not (args.no_doc or args.rate_untold):
        write_section("malicious", body, "Malicious servers: trap weights, imprint and class fishing on one update")


if __name__ == "__main__":
    main()
