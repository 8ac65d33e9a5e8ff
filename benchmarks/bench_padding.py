"""Zero padding a model writes before its convolutions, read into them: a ``ZeroPad2d`` before a conv that pads
nothing against the same conv padding by itself (the twins), and convolutions padded on one side only, which have no
such twin: a causal ``Conv1d`` (``F.pad(x, (k - 1, 0))``) and a ``Conv2d`` with ``padding='same'`` and an even
kernel (torch pads one more zero after than before).

Data: LFW faces (``lfw``, two classes; read as 625-sample signals by the ``Conv1d``) and Fashion-MNIST (the 2-D
models). Per model, seed (3) and batch size (1, 4, 8): the exact attack on the client's gradient with its batch size:
certified, exact, false certificates; for the twins, whether the same samples certify and the largest difference of
their inputs.

    python benchmarks/bench_padding.py          # about a minute on 2 cores

Results go to ``benchmarks/results/bench_padding.json``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from run_meta import run_meta, seeded_arguments, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "bench_padding.json"


class Padded(nn.Module):
    """``nn.ZeroPad2d(1)`` then a 3 x 3 conv of 8 channels without padding (``own``: the conv pads by 1 itself)."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.pad = nn.Identity() if own else nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(1, 8, 3, padding=1 if own else 0)
        self.fc, self.out = nn.Linear(8 * 28 * 28, 512), nn.Linear(512, 10)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(self.conv(self.pad(x.view(-1, 1, 28, 28)))).flatten(1))))


class Causal(nn.Module):
    """A causal ``Conv1d`` of 16 channels, kernel 5, over 625-sample signals."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 5)
        self.fc, self.out = nn.Linear(16 * 625, 512), nn.Linear(512, 2)

    def forward(self, x):
        a = self.conv(F.pad(x.view(x.size(0), 1, 625), (4, 0)))
        return self.out(F.relu(self.fc(F.relu(a).flatten(1))))


class EvenSame(nn.Module):
    """A ``Conv2d`` of 8 channels with a 2 x 2 kernel and ``padding='same'``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 2, padding="same")
        self.fc, self.out = nn.Linear(8 * 28 * 28, 512), nn.Linear(512, 10)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(self.conv(x.view(-1, 1, 28, 28))).flatten(1))))


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> fedleak.Reconstruction:
    update = fedleak.compute_gradient_update(model, x, y)
    return fedleak.reconstruct(model, update, attack="exclusivity", input_shape=tuple(x.shape[1:]))


def main() -> None:
    args = seeded_arguments(__doc__, RESULTS)
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    data = {"fashion-mnist": fedleak.load_dataset("fashion-mnist"), "lfw": fedleak.load_dataset("lfw")}
    rows = []
    for name, make, on in (("zero-pad2d then conv", lambda: Padded(False), "fashion-mnist"),
                           ("causal conv1d", Causal, "lfw"), ("same, even kernel", EvenSame, "fashion-mnist")):
        for seed in range(args.seed, args.seed + 3):
            torch.manual_seed(seed)
            model = make().eval()
            twin = None
            if isinstance(model, Padded):
                twin = Padded(True).eval()
                twin.load_state_dict(model.state_dict())
            for size in (1, 4, 8):
                x, y = data[on].batch(size, seed=1000 + 10 * seed + size)
                rec = attack(model, x, y)
                score = fedleak.metrics.match(rec, x, y)
                row = {"model": name, "data": on, "seed": seed, "batch": size, "certified": rec.num_certified,
                       "exact": int(score.exact.sum()), "false": score.false_certificates}
                if twin is not None:
                    read = attack(twin, x, y)
                    row["twin_certified"] = read.num_certified
                    row["same_samples"] = rec.certified.tolist() == read.certified.tolist()
                    row["max_input_difference"] = float((rec.inputs - read.inputs).abs().max()) if len(rec) and \
                        rec.inputs.shape == read.inputs.shape else None
                rows.append(row)
    totals = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        totals[name] = {"samples": sum(r["batch"] for r in mine), "certified": sum(r["certified"] for r in mine),
                        "exact": sum(r["exact"] for r in mine), "false": sum(r["false"] for r in mine)}
        if "twin_certified" in mine[0]:
            totals[name] |= {"twin_certified": sum(r["twin_certified"] for r in mine),
                             "cells_differing": sum(not r["same_samples"] for r in mine),
                             "max_input_difference": max(r["max_input_difference"] or 0.0 for r in mine)}
    meta = run_meta(f"python benchmarks/bench_padding.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, totals=totals, rows=rows)
    for name, t in totals.items():
        print(name, t)


if __name__ == "__main__":
    main()
