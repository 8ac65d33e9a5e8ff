"""Benchmark: fishing and exclusivity reduction of models that normalise their input inside ``forward``.

A user's model that starts with ``x = (x - self.mean) / self.std`` (buffers: one number, a mean image, or per channel)
is fished as it is, in pixels; the client computes its gradient of the fished batch through its own forward, and the
exact attack reads it. Beside it, the data normalised first and the model passed without the map, fished in one
interval (the union of the channels' ranges, all a single ``data_range`` can state) and told the normalisation
(``normalization=``): the fished values are mapped back to pixels and counted outside [0, 1]. Exclusivity reduction
of the same batches is attacked the same way.

Models at torch's default initialisation: an MLP class of 1024 hidden units (``x.view``, ``F.relu``) and a CNN class
(a 3x3 conv of 16 channels, padding 1, a dense layer of 256). Data: Fashion-MNIST's train split, two-class LFW and
retina colour patches. Per cell: samples certified from the client's gradient of the batch before fishing and after
(with its size), rebuilt inputs within 1e-4 of [0, 1] of a sent image (pixels), false certificates, median L-inf and
PSNR of the perturbation (pixels), median fishing time; the data-side ways' fished values outside [0, 1];
certified after exclusivity reduction.

Results go to ``benchmarks/results/fishing_normalised.json`` and the table to docs/benchmarks.md.

    python benchmarks/bench_fishing_normalised.py        # about two minutes on 2 cores
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
from fedleak.defenses import reduce_exclusivity
from fedleak.nets.input_peel import peel_input_map

RESULTS = Path(__file__).resolve().parent / "results" / "fishing_normalised.json"
# (data, model, normalisation, batch size, batches)
CELLS = (("fashion-mnist-train", "mlp", "number", 32, 4), ("lfw", "mlp", "number", 16, 4),
         ("fashion-mnist-train", "mlp", "mean image", 32, 4), ("retina", "mlp", "channel", 32, 4),
         ("retina", "cnn", "channel", 8, 3))


class Normalising(nn.Module):
    """``(x - mean) / std`` (buffers of any broadcastable shape), then an MLP or a one-conv CNN."""

    def __init__(self, shape: tuple[int, ...], classes: int, mean: torch.Tensor, std: torch.Tensor, arch: str):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        channels = shape[0]
        self.conv = nn.Conv2d(channels, 16, 3, padding=1) if arch == "cnn" else None
        width = 16 * shape[1] * shape[2] if arch == "cnn" else int(torch.tensor(shape).prod())
        self.fc1 = nn.Linear(width, 256 if arch == "cnn" else 1024)
        self.fc2 = nn.Linear(self.fc1.out_features, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        if self.conv is not None:
            x = F.relu(self.conv(x))
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def _statistics(data: fedleak.Dataset, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The data set's own mean and std: one number each, a mean image with one std, or per channel."""
    x = data.x.double()
    if kind == "number":
        return torch.tensor(float(x.mean())), torch.tensor(float(x.std()))
    if kind == "mean image":
        return x.mean(0).float(), torch.tensor(float(x.std()))
    dims = [0, *range(2, x.dim())]
    return x.mean(dims).view(-1, 1, 1).float(), x.std(dims).view(-1, 1, 1).float()


def _rebuilt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shape) -> tuple[fedleak.Reconstruction, object]:
    """The exact attack on the client's gradient of ``x`` (through its own forward, with its size), scored in pixels."""
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    update = fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=len(x))
    rec = fedleak.reconstruct(model, update, input_shape=shape)
    return rec, fedleak.metrics.match(rec, x, y, data_range=(0.0, 1.0))


def _outside_data_side(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shape, kind: str) -> tuple[int, int | None]:
    """The values outside [0, 1], in pixels, of the batch fished with the data normalised first and the model passed
    without the map: in one data range (the union of every value's image of [0, 1]), and told the normalisation
    (``normalization=``; None for a mean image, which is no per-channel normalisation)."""
    stripped, input_map = peel_input_map(model, input_shape=shape)
    z = input_map.to_first_layer(x)
    ends = torch.stack([input_map.shift, input_map.scale + input_map.shift])
    span = (float(ends.min()) - 1e-6, float(ends.max()) + 1e-6)
    counts = [_outside(input_map.to_inputs(fedleak.fish(stripped, z, y, data_range=span).inputs.double()))]
    if kind == "mean image":
        return counts[0], None
    told = fedleak.normalization(model.mean.flatten().tolist(), model.std.flatten().tolist())
    counts.append(_outside(input_map.to_inputs(fedleak.fish(stripped, z, y, normalization=told).inputs.double())))
    return counts[0], counts[1]


def _outside(pixels: torch.Tensor) -> int:
    return int(((pixels < -1e-6) | (pixels > 1 + 1e-6)).sum())


def cell(name: str, arch: str, kind: str, batch: int, batches: int, seed: int) -> dict:
    data = fedleak.load_dataset(name)
    shape, classes = data.input_shape, int(data.y.max()) + 1
    mean, std = _statistics(data, kind)
    row = {"data": name, "model": arch, "normalisation": kind, "batch": batch, "samples": 0, "before": 0,
           "after": 0, "exact": 0, "false": 0, "outside_unread": 0, "outside_told": 0, "reduced": 0, "kept": 0}
    linf, psnr, secs = [], [], []
    for k in range(batches):
        torch.manual_seed(seed + k)
        model = Normalising(shape, classes, mean, std, arch).eval()
        x, y = data.batch(batch, seed=seed + 100 + k)
        start = time.perf_counter()
        fished = fedleak.fish(model, x, y)
        secs.append(time.perf_counter() - start)
        linf += [s.linf for s in fished.samples]
        psnr += [s.psnr for s in fished.samples if s.perturbed]
        row["samples"] += batch
        row["before"] += _rebuilt(model, x, y, shape)[0].num_certified
        rec, score = _rebuilt(model, fished.inputs, y, shape)
        row["after"] += rec.num_certified
        row["exact"] += int(score.exact.sum())
        row["false"] += score.false_certificates
        unread, told = _outside_data_side(model, x, y, shape, kind)
        row["outside_unread"] += unread
        row["outside_told"] = None if told is None else row["outside_told"] + told
        reduced = reduce_exclusivity(model, x, y)
        row["kept"] += len(reduced.labels)
        row["reduced"] += _rebuilt(model, reduced.inputs, reduced.labels, shape)[0].num_certified
    row.update(linf=statistics.median(linf), psnr=statistics.median(psnr) if psnr else None,
               seconds=statistics.median(secs))
    return row


NAMES = {"fashion-mnist-train": "Fashion-MNIST train", "lfw": "LFW (two classes)", "retina": "retina (colour)"}
KINDS = {"number": "one mean and std", "mean image": "mean image, one std", "channel": "per channel"}


def _table(rows: list[dict]) -> str:
    lines = ["| data | model | normalisation | certified before / after fishing | exact in pixels | false | "
             "median L-inf / PSNR | fishing s | outside [0, 1], data normalised first: one range / told | "
             "certified after reduction |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        model = "MLP of 1024" if r["model"] == "mlp" else "CNN (16 ch, 256)"
        psnr = "-" if r["psnr"] is None else f"{r['psnr']:.1f} dB"
        lines.append(f"| {NAMES[r['data']]}, batches of {r['batch']} | {model} | {KINDS[r['normalisation']]} | "
                     f"{r['before']} / {r['after']} of {r['samples']} | {r['exact']} | {r['false']} | "
                     f"{r['linf']:.4f} / {psnr} | {r['seconds']:.2f} | {r['outside_unread']} / "
                     f"{'-' if r['outside_told'] is None else r['outside_told']} | "
                     f"{r['reduced']} of {r['kept']} sent |")
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
    meta = run_meta(f"python benchmarks/bench_fishing_normalised.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, rows=rows)
    if args.out == RESULTS:
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; user "
                "classes at torch's default initialisation that normalise inside `forward` (`(x - self.mean) / "
                "self.std`, buffers) by the data set's own statistics; fishing with its defaults, then the exact "
                "attack on the client's gradient of the fished batch (through its own forward, with its size). "
                "Exact: rebuilt inputs within 1e-4 of [0, 1] of a sent image; L-inf and PSNR of the perturbation in "
                "pixels (PSNR over the moved samples); fishing time: median per batch. 'Data normalised first': the "
                "same batches fished with the model without its map, in one data range (the union of the "
                "channels' ranges) and told the normalisation (`normalization=`; a mean image is none), the "
                "fished values mapped back to pixels and counted outside [0, 1]. Reduction: "
                f"exclusivity reduction's batch, attacked the same way. Command: `{meta['command']}`._\n\n"
                + _table(rows))
        write_section("fishing-normalised", body, "Fishing models that normalise inside forward")
    print(_table(rows))


if __name__ == "__main__":
    main()
