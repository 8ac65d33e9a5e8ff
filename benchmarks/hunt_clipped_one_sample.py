"""Hunt for false certificates of the first-layer attack on one-sample gradients clipped by value, and negated.

A user's MLP (an ``nn.Module`` with ``torch.flatten``, ``F.relu`` and Dropout in eval mode, 256 hidden units) and
fedleak's two-hidden-layer MLP (128, 128), torch's default initialisation, on every built-in data set; per data set
``--seeds`` models of each kind and three one-sample draws each, raw and standardised; every gradient clipped by
value at 0.9, 0.5, 0.1, 0.01 and 0.001 of its largest entry (``clip_grad_value_``), and also negated (a weight
change new - old passed as a gradient) where the data have three classes or more. A certificate is false when its
input is off the sample by more than 1e-4 of the sample's range, or its label is not the sample's.

Results go to ``benchmarks/results/hunt_clipped_one_sample.json``.

    python benchmarks/hunt_clipped_one_sample.py      # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "hunt_clipped_one_sample.json"
DATA = ("digits", "fashion-mnist", "lfw", "retina", "mni152")
FRACTIONS = (0.9, 0.5, 0.1, 0.01, 0.001)


class DropoutMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int, classes: int):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(in_features, hidden), nn.Dropout(0.25), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(torch.flatten(x, 1)))))


def hunt(name: str, seeds: int) -> dict:
    data = fedleak.load_dataset(name)
    out = {"data": name, "gradients": 0, "certified": 0, "false": 0, "worst_error": 0.0}
    signs = (1, -1) if data.num_classes >= 3 else (1,)
    for seed in range(seeds):
        torch.manual_seed(seed)
        models = (DropoutMLP(math.prod(data.input_shape), 256, data.num_classes).eval(),
                  fedleak.make_mlp(data.input_shape, (128, 128), data.num_classes, seed=seed))
        for model in models:
            for k in range(3):
                x, y = data.batch(1, seed=100 * seed + k)
                for inputs in (x, (x - x.mean()) / x.std()):
                    grads = fedleak.compute_gradient_update(model, inputs, y).gradients
                    top = max(float(t.abs().max()) for t in grads.values())
                    span = float(inputs.max() - inputs.min())
                    for fraction in FRACTIONS:
                        for sign in signs:
                            bound = fraction * top
                            update = fedleak.GradientUpdate(
                                {n: sign * t.clamp(-bound, bound) for n, t in grads.items()}, num_examples=1)
                            rec = fedleak.reconstruct(model, update, attack="first-layer",
                                                      input_shape=tuple(inputs.shape[1:]))
                            out["gradients"] += 1
                            if rec.num_certified:
                                out["certified"] += 1
                                error = float((rec.inputs[0] - inputs[0]).abs().max()) / span
                                out["worst_error"] = max(out["worst_error"], error)
                                out["false"] += int(error > 1e-4 or int(rec.labels[0]) != int(y[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="models of each kind per data set")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in DATA:
        rows.append(hunt(name, args.seeds))
        r = rows[-1]
        print(f"{name}: {r['gradients']} gradients, {r['certified']} certified, {r['false']} false, worst error "
              f"{r['worst_error']:.1e} of the range", flush=True)
    meta = run_meta(f"python benchmarks/hunt_clipped_one_sample.py --seeds {args.seeds}", seeds=args.seeds,
                    fractions=list(FRACTIONS))
    write_results(args.out, meta=meta, rows=rows)
    total = {k: sum(r[k] for r in rows) for k in ("gradients", "certified", "false")}
    print(f"all: {total['gradients']} gradients, {total['certified']} certified, {total['false']} false")


if __name__ == "__main__":
    main()
