"""Hunt for false certificates of the class-fishing attack.

Every batch draws a data set (digits, Fashion-MNIST, two-class LFW, retina patches, MNI152 slices), an MLP with one
hidden layer of 32 to 1000 units (fedleak's builder, seeded), a batch of 4 to 256 samples, a fished class (the
label of a random sample of the batch) and a multiplier (0.01, 0.5, 2 or 8), and sometimes makes the batch harder:
a copy of a sample of the fished class (exact, or off by 1e-6), two of its samples darkened to 0.003 of their
pixels (near-black images: tiny norms, the same absolute rounding), or the whole batch normalised as users do
((x - 0.5) / 0.25, the range with it). The client sends its mean cross-entropy gradient with its batch size, or
one SGD step at rate 0.01, 0.1 or 1 as a weight update that the server reads with the rate and the one step it set.
Every certified reconstruction is scored by ``fedleak.metrics.match``: within 1e-4 of the range of an original with
its label, and no two claiming one original.

    python benchmarks/hunt_class_fishing.py [--seconds 450] [--seed 10] [--no-doc]
    python benchmarks/hunt_class_fishing.py --render     # the table of every results file, into the docs

Writes ``benchmarks/results/class_fishing_hunt_<seed>.json`` (versions, seed, settings, the machine, the counts per
data set and update) and, unless ``--no-doc``, the table of every such file into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DATA = ("digits", "fashion-mnist", "lfw", "retina", "mni152")


def one_batch(data: fedleak.Dataset, gen: np.random.Generator) -> tuple[str, dict]:
    """One batch's update kind and counts."""
    width = int(gen.choice([32, 64, 128, 256, 1000]))
    m = min(int(gen.choice([4, 16, 64, 128, 256])), len(data) // 2)
    x, y = data.batch(m, seed=int(gen.integers(1 << 30)))
    x = x.clone()
    if gen.random() < 0.3:  # a copy of a sample of the first label, exact or off by 1e-6
        k = int(torch.nonzero(y == y[0])[0])
        copy = x[k:k + 1] + (0.0 if gen.random() < 0.5 else 1e-6 * torch.randn_like(x[k:k + 1]))
        x, y = torch.cat([x, copy.clamp(*data.value_range)]), torch.cat([y, y[k:k + 1]])
    target = int(y[int(gen.integers(len(y)))])
    if gen.random() < 0.2:  # near-black samples of the fished class
        for k in torch.nonzero(y == target).flatten()[:2].tolist():
            x[k] = x[k] * 0.003
    lo, hi = data.value_range
    if gen.random() < 0.2:  # normalised as users do
        x, lo, hi = (x - 0.5) / 0.25, (lo - 0.5) / 0.25, (hi - 0.5) / 0.25
    model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=int(gen.integers(1000)))
    fished = fedleak.class_fishing_weights(model, target, data_range=(lo, hi),
                                           multiplier=float(gen.choice([0.01, 0.5, 2.0, 8.0])))
    if gen.random() < 0.5:
        kind, update = "gradient", fedleak.compute_gradient_update(fished, x, y)
    else:
        lr = float(gen.choice([0.01, 0.1, 1.0]))
        kind = "one step"
        update = dataclasses.replace(fedleak.fedavg_update(fished, x, y, lr=lr, local_steps=1), learning_rate=lr,
                                     local_steps=1)
    rec = fedleak.reconstruct(fished, update, attack="class-fishing", data_range=(lo, hi))
    scores = fedleak.metrics.match(rec, x, y, data_range=(lo, hi))
    return kind, dict(batches=1, fished=int((y == target).sum()), certified=scores.n_certified,
                      recovered=int(scores.recovered.sum()), false=scores.false_certificates)


def render(files: list[Path]) -> str:
    runs = [json.loads(f.read_text()) for f in files]
    total: dict[tuple[str, str], dict] = {}
    for run in runs:
        for row in run["rows"]:
            cell = total.setdefault((row["data"], row["update"]), dict.fromkeys(("batches", "fished", "certified",
                                                                                 "recovered", "false"), 0))
            for key in cell:
                cell[key] += row[key]
    lines = ["| data | update | batches | samples of the fished class | certified | of them exact "
             "| false certificates |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (data, update), c in sorted(total.items()):
        lines.append(f"| {data} | {update} | {c['batches']:,} | {c['fished']:,} | {c['certified']:,} | "
                     f"{c['recovered']:,} | {c['false']} |")
    seeds = ", ".join(str(r["settings"]["seed"]) for r in runs)
    head = (f"_Measured {runs[0]['date']} on {runs[0]['machine']}, torch {torch.__version__} pinned to one thread: "
            f"`python benchmarks/hunt_class_fishing.py --seconds {runs[0]['settings']['seconds']} --seed S` for S in "
            f"{seeds}, one process each, two at a time; results in `benchmarks/results/class_fishing_hunt_S.json`._")
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=450.0)
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--no-doc", action="store_true", help="do not write the table into docs/benchmarks.md")
    ap.add_argument("--render", action="store_true", help="only write the table of the results files into the docs")
    args = ap.parse_args()
    if args.render:
        write_section("class_fishing_hunt", render(sorted(RESULTS.glob("class_fishing_hunt_*.json"))),
                      "Certificate hunt: class fishing")
        return
    torch.set_num_threads(1)
    gen = np.random.default_rng(args.seed)
    data = {name: fedleak.load_dataset(name) for name in DATA}
    counts: dict[tuple[str, str], dict] = {}
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        name = str(gen.choice(DATA))
        kind, row = one_batch(data[name], gen)
        cell = counts.setdefault((name, kind), dict.fromkeys(row, 0))
        for key, value in row.items():
            cell[key] += value
        if row["false"]:
            print(f"false certificate: {name}, {kind}", flush=True)
    rows = [dict(data=d, update=u, **c) for (d, u), c in sorted(counts.items())]
    machine = f"{os.cpu_count()} cores of an {cpu_model()}, {platform.machine()}"
    out = RESULTS / f"class_fishing_hunt_{args.seed}.json"
    write_json(out, dict(settings=vars(args), environment=environment_info(), machine=machine,
                         date=datetime.date.today().isoformat(), rows=rows))
    print(json.dumps(rows, indent=1))
    if not args.no_doc:
        write_section("class_fishing_hunt", render(sorted(RESULTS.glob("class_fishing_hunt_*.json"))),
                      "Certificate hunt: class fishing")


if __name__ == "__main__":
    main()
