"""Certificate hunt: models whose forward does constant arithmetic on a Linear layer's output (``logits /
temperature``, ``logits + log_prior``).

The exact methods fold such arithmetic into the layer and read the client's gradient as the twin's. Each cell attacks
the client's gradient of a user class (an MLP of 256 at torch's default initialisation whose logits are multiplied by
0.05, 0.5, 2, 50, -1 or a per-class vector from 0.5 to 3, then, or not, shifted by a per-class log prior, with or
without its hidden layer's output scaled by 2.5) and of its twin (the same network with the scales multiplied into its
weights and the shift added to its bias), on batches of 1, 4 and 8 of sklearn digits, Fashion-MNIST and two-class
LFW, natural or a sample and its copies moved by noise of 1e-3 (one label), with and without the batch size. Counts:
certified and false certificates for both, and the cells where the two certify different samples.

``--update weights`` attacks one-step FedAvg weight changes instead (SGD at learning rate 0.1; the second repeat with
weight decay 5e-3), with the rate known to the server or not in place of the batch size (always reported); the twin
gets its own change, which rounds at its own weights: "differ" counts the cells where the twin certifies a sample
the model's change does not.

    python benchmarks/hunt_output_affine.py                     # about five minutes on 2 cores
    python benchmarks/hunt_output_affine.py --update weights    # about eight minutes

Results go to ``benchmarks/results/hunt_output_affine.json`` (``hunt_output_affine_weights.json``).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
from hunt_common import hunt_batch, hunt_options
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F

import fedleak

DATA = ("digits", "fashion-mnist", "lfw")
SCALES = (0.05, 0.5, 2.0, 50.0, "per class", -1.0)


class Mapped(nn.Module):
    def __init__(self, inputs: int, classes: int, out_scale, prior: bool, hidden_scale: float | None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, 256)
        self.fc2 = nn.Linear(256, classes)
        gain = torch.linspace(0.5, 3.0, classes) if out_scale == "per class" else torch.tensor(float(out_scale))
        self.register_buffer("gain", gain)
        counts = torch.linspace(1.0, 4.0, classes)
        self.register_buffer("log_prior", (counts / counts.sum()).log() if prior else torch.zeros(()))
        self.hidden_scale = hidden_scale

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        if self.hidden_scale is not None:
            h = h * self.hidden_scale
        return self.fc2(F.relu(h)) * self.gain + self.log_prior


def twin(model: Mapped) -> nn.Sequential:
    """The same network with its scales multiplied into the weights and its shift added to the bias."""
    hs = 1.0 if model.hidden_scale is None else model.hidden_scale
    out = model.gain.double().expand(model.fc2.out_features)
    shift = model.log_prior.double().expand(model.fc2.out_features)
    net = nn.Sequential(nn.Flatten(), nn.Linear(model.fc1.in_features, 256), nn.ReLU(),
                        nn.Linear(256, model.fc2.out_features))
    with torch.no_grad():
        net[1].weight.copy_(model.fc1.weight.double() * hs)
        net[1].bias.copy_(model.fc1.bias.double() * hs)
        net[3].weight.copy_(model.fc2.weight.double() * out[:, None])
        net[3].bias.copy_(model.fc2.bias.double() * out + shift)
    return net.eval()


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int | None) -> fedleak.GradientUpdate:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=size)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rate_known: bool, decay: float) -> fedleak.WeightUpdate:
    """The client's one local SGD step, the rate told to the server or not."""
    change = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1, weight_decay=decay)
    return change if rate_known else replace(change, learning_rate=None)


def main() -> None:
    base, weights, out = hunt_options(__doc__, "hunt_output_affine")
    update = "weights" if weights else "gradient"
    torch.set_num_threads(1)
    totals = {"cells": 0, "certified": 0, "false": 0, "twin_certified": 0, "twin_false": 0, "differ": 0}
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        cells = itertools.product(SCALES, (False, True), (None, 2.5), (1, 4, 8), (0, 1), (False, True), (True, False))
        for scale, prior, hidden, size, rep, copies, sized in cells:
            seed = base + rep
            torch.manual_seed(seed)
            model = Mapped(data.x[0].numel(), data.num_classes, scale, prior, hidden).eval()
            x, y = hunt_batch(data, size, seed + 10, copies)
            other = twin(model).float()
            if weights:  # sized: the learning rate known
                rec = fedleak.reconstruct(model, step(model, x, y, sized, 5e-3 * rep), attack="exclusivity")
                rec_twin = fedleak.reconstruct(other, step(other, x, y, sized, 5e-3 * rep), attack="exclusivity")
            else:
                count = size if sized else None
                rec = fedleak.reconstruct(model, gradient(model, x, y, count))
                rec_twin = fedleak.reconstruct(other, gradient(other, x, y, count))
            score, twin_score = fedleak.metrics.match(rec, x, y), fedleak.metrics.match(rec_twin, x, y)
            false, twin_false = score.false_certificates, twin_score.false_certificates
            # (the uncertified rows either reads may differ: the two gradients differ by float32's rounding)
            mine, theirs = set(score.certified_original.tolist()), set(twin_score.certified_original.tolist())
            differ = not theirs <= mine if weights else mine != theirs
            totals["cells"] += 1
            totals["certified"] += rec.num_certified
            totals["false"] += false
            totals["twin_certified"] += rec_twin.num_certified
            totals["twin_false"] += twin_false
            totals["differ"] += int(differ)
            rows.append({"data": name, "scale": scale, "prior": prior, "hidden_scale": hidden, "batch": size,
                         "repeat": rep, "copies": copies, "rate_known" if weights else "sized": sized,
                         "certified": rec.num_certified,
                         "false": false, "twin_certified": rec_twin.num_certified, "twin_false": twin_false,
                         "differ": differ})
        print(name, {k: v for k, v in totals.items()}, flush=True)
    meta = run_meta(f"python benchmarks/hunt_output_affine.py --seed {base} --update {update}",
                    seed=base)
    write_results(out, meta=meta, totals=totals, rows=rows)
    print(totals)


if __name__ == "__main__":
    main()
