"""Certificate hunt: fishing models that normalise their input inside ``forward``, then the exact attack.

User classes at torch's default initialisation that compute ``(x - mean) / std`` first (buffers: the data set's mean
and std as one number, per channel, per value (a mean image, its std plus 0.05), or an inverting ``(x - 1) / -0.5``;
or per channel and then ``.transpose(2, 3)``, a change of layout, which fishing writes its LPs through), then an MLP
of 1024, an MLP of 1024 and 256, or a CNN (a 3x3 conv of 16 channels, padding 1, a dense layer of 256);
half of them divide their logits by a temperature of 0.5. On Fashion-MNIST, two-class LFW and retina colour
patches, batches of 4 and 16 (the CNN: 4), two seeds. Each batch is fished with the defaults, the client computes its
gradient of the fished batch through its own forward and reports its size, and the exact attack reads it. Counts:
samples, certified, rebuilt within 1e-4 of the range of a sent input, false certificates; every fished value is
checked to lie in the data's range.

    python benchmarks/hunt_fishing_maps.py          # about a minute on 2 cores

Results go to ``benchmarks/results/hunt_fishing_maps.json``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from run_meta import run_meta, seeded_arguments, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "hunt_fishing_maps.json"
DATA = ("fashion-mnist", "lfw", "retina")
ARCHS = {"mlp": (1024,), "mlp2": (1024, 256), "cnn": (256,)}
MAPS = ("number", "channel", "value", "inverting", "transposed")


class Normalising(nn.Module):
    def __init__(self, shape, classes: int, widths, conv: bool, mean, std, temperature: float,
                 transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.temperature = temperature
        self.conv = nn.Conv2d(shape[0], 16, 3, padding=1) if conv else None
        width = 16 * shape[1] * shape[2] if conv else shape[0] * shape[1] * shape[2]
        layers = []
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        if self.transposed:
            x = x.transpose(2, 3)
        if self.conv is not None:
            x = F.relu(self.conv(x))
        return self.out(self.body(x.flatten(1))) / self.temperature


def statistics(data: fedleak.Dataset, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = data.x.double()
    if kind == "number":
        return torch.tensor(float(x.mean())), torch.tensor(float(x.std()))
    if kind in ("channel", "transposed"):
        return x.mean((0, 2, 3)).view(-1, 1, 1).float(), x.std((0, 2, 3)).view(-1, 1, 1).float()
    if kind == "value":
        return x.mean(0).float(), x.std(0).float() + 0.05
    return torch.tensor(1.0), torch.tensor(-0.5)


def main() -> None:
    args = seeded_arguments(__doc__, RESULTS)
    totals = {"batches": 0, "samples": 0, "certified": 0, "exact": 0, "false": 0}
    rows = []
    for name, arch, kind, size, rep in itertools.product(DATA, ARCHS, MAPS, (4, 16), (0, 1)):
        if arch == "cnn" and size > 4:
            continue
        data = fedleak.load_dataset(name)
        seed = args.seed + rep
        torch.manual_seed(seed)
        model = Normalising(data.input_shape, data.num_classes, ARCHS[arch], arch == "cnn", *statistics(data, kind),
                            0.5 if rep else 1.0, transposed=kind == "transposed").eval()
        x, y = data.batch(size, seed=100 + seed)
        fished = fedleak.fish(model, x, y)
        lo, hi = data.value_range
        if not (float(fished.inputs.min()) >= lo and float(fished.inputs.max()) <= hi):
            raise SystemExit(f"fished values leave the data range on {name} {arch} {kind}")
        grads = torch.autograd.grad(F.cross_entropy(model(fished.inputs), y), list(model.parameters()))
        update = fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)},
                                        num_examples=size)
        rec = fedleak.reconstruct(model, update, input_shape=data.input_shape)
        score = fedleak.metrics.match(rec, fished.inputs, y, data_range=data.value_range)
        row = {"data": name, "model": arch, "map": kind, "batch": size, "repeat": rep, "samples": size,
               "fished": int(fished.certifiable_after.sum()), "certified": rec.num_certified,
               "exact": int(score.exact.sum()), "false": score.false_certificates}
        rows.append(row)
        totals["batches"] += 1
        for key in ("samples", "certified", "exact", "false"):
            totals[key] += row[key]
    meta = run_meta(f"python benchmarks/hunt_fishing_maps.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, totals=totals, rows=rows)
    print(totals)


if __name__ == "__main__":
    main()
