"""Benchmark of models that normalise their input inside ``forward``.

A user's model that starts with ``x = (x - self.mean) / self.std`` (buffers) is attacked as it is, and against the
other way to run it: the same normalisation applied to the data first, the model passed without it (the same weights
and batches). Models: an MLP class (``x.view``, ``F.relu``, 1024 hidden units, the data set's own mean and std)
and a CNN class (a 3x3 conv of 16 channels, a dense layer of 256; ImageNet's statistics per channel), at torch's
default initialisation; on Fashion-MNIST's train split, two-class LFW, MNI152 slices and retina images. Per cell:
certified samples both ways, false certificates (in pixels for the model as it is, against the normalised inputs for
the other), inputs within 1e-4 of the range of a sent image (in pixels), and the attack's median time both ways.

Results go to ``benchmarks/results/normalisation.json`` and the table to docs/benchmarks.md.

    python benchmarks/bench_normalisation.py        # about a minute on 2 cores
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
from fedleak.nets.input_peel import peel_input_map

RESULTS = Path(__file__).resolve().parent / "results" / "normalisation.json"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# (data, model, batch size, update, batches)
CELLS = (("fashion-mnist-train", "mlp", 8, "gradient", 6), ("fashion-mnist-train", "mlp", 8, "fedavg", 6),
         ("lfw", "mlp", 8, "gradient", 6), ("mni152", "mlp", 16, "gradient", 6), ("retina", "cnn", 4, "gradient", 3))


class NormalisingMLP(nn.Module):
    def __init__(self, inputs: int, classes: int, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.fc1 = nn.Linear(inputs, 1024)
        self.fc2 = nn.Linear(1024, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class NormalisingCNN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET[0]).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET[1]).view(3, 1, 1))
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 32 * 32, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1))))


def _update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str):
    if kind == "fedavg":
        return fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=len(x))


def _timed(model: nn.Module, update, shape) -> tuple[fedleak.Reconstruction, float]:
    start = time.perf_counter()
    rec = fedleak.reconstruct(model, update, input_shape=shape)
    return rec, time.perf_counter() - start


def cell(name: str, arch: str, batch: int, kind: str, batches: int, seed: int) -> dict:
    data = fedleak.load_dataset(name)
    classes = int(data.y.max()) + 1
    shape = data.input_shape
    row = {"data": name, "model": arch, "batch": batch, "update": kind, "samples": 0, "certified": 0,
           "certified_first": 0, "false": 0, "false_first": 0, "exact": 0}
    times, times_first = [], []
    for k in range(batches):
        torch.manual_seed(seed + k)
        model = (NormalisingMLP(data.x[0].numel(), classes, float(data.x.mean()), float(data.x.std())) if arch == "mlp"
                 else NormalisingCNN(classes)).eval()
        x, y = data.batch(batch, seed=seed + 100 + k)
        stripped, input_map = peel_input_map(model, input_shape=shape)
        z = input_map.to_first_layer(x)
        rec, t = _timed(model, _update(model, x, y, kind), shape)
        first, t_first = _timed(stripped, _update(stripped, z, y, kind), shape)
        score = fedleak.metrics.match(rec, x, y, data_range=data.value_range)
        row["samples"] += batch
        row["certified"] += rec.num_certified
        row["certified_first"] += first.num_certified
        row["false"] += score.false_certificates
        row["false_first"] += fedleak.metrics.match(first, z, y).false_certificates
        row["exact"] += int(score.exact.sum())
        times.append(t)
        times_first.append(t_first)
    row["ms"] = 1e3 * statistics.median(times)
    row["ms_first"] = 1e3 * statistics.median(times_first)
    return row


NAMES = {"fashion-mnist-train": "Fashion-MNIST train", "lfw": "LFW (two classes)", "mni152": "MNI152 slices",
         "retina": "retina"}


def _table(rows: list[dict]) -> str:
    lines = ["| data | model | update | certified (inside forward / data normalised first) | false certificates | "
             "exact in pixels | attack ms (inside / first) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        model = "MLP of 1024" if r["model"] == "mlp" else "CNN, per channel"
        update = "gradient" if r["update"] == "gradient" else "FedAvg, 1 step, lr 0.1"
        lines.append(f"| {NAMES[r['data']]}, batches of {r['batch']} | {model} | {update} | {r['certified']} / "
                     f"{r['certified_first']} of {r['samples']} | {r['false']} / {r['false_first']} | {r['exact']} | "
                     f"{r['ms']:.1f} / {r['ms_first']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' table: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for spec in CELLS:
        rows.append(cell(*spec, seed=args.seed))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_normalisation.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, rows=rows)
    if args.out == RESULTS:
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; user "
                "classes at torch's default initialisation that normalise inside `forward` (`(x - self.mean) / "
                "self.std`, buffers): an MLP (`x.view`, `F.relu`) by the data set's own mean and std, a CNN per "
                "channel by ImageNet's; each attacked as it is and as the same model without the normalisation on "
                "the normalised batch (same weights and batches). Certified and false certificates: inside forward "
                "/ data normalised first; exact: rebuilt inputs within 1e-4 of the range of a sent image, in pixels; "
                f"times: medians over the batches. Command: `{meta['command']}`._\n\n" + _table(rows))
        write_section("normalisation", body, "Models that normalise inside forward")
    print(_table(rows))


if __name__ == "__main__":
    main()
