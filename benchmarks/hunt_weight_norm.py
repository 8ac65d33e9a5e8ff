"""Certificate hunt: models whose Linear layers compute their weights by weight normalisation.

The exact methods read such a layer as the plain layer with the weight it computes, ``g v / ||v||``, and rebuild the
weight's gradient from ``g``'s and ``v``'s. Each cell attacks the client's update of a user class (an MLP of one or
two hidden layers of 256, every Linear layer under ``torch.nn.utils.parametrizations.weight_norm`` or the older
``torch.nn.utils.weight_norm``, each ``g`` then scaled by a factor from 0.5 to 2 so that the weights' norms differ
from ``v``'s) and of its twin (plain Linear layers with the same weights), on batches of 1, 4 and 8 of sklearn digits,
Fashion-MNIST and two-class LFW, natural or a sample and its copies moved by noise of 1e-3 (one label), with and
without the batch size. Grounds: ``plain`` (the update as the client sent it); ``scaled`` (``g``'s gradient doubled
and ``v``'s halved, as clipping each tensor apart would leave it: the rebuilt gradient is then no gradient of the
model); ``noised`` (Gaussian noise of 1e-3 of each tensor's largest entry added). Counts: certified and false
certificates for both, and the cells where the model certifies a sample its twin does not.

``--update weights`` attacks one-step FedAvg weight changes instead (SGD at learning rate 0.1; the second repeat with
weight decay 5e-3, which the exact route does not read through weight normalisation), with the rate known to the
server or not in place of the batch size (always reported); grounds ``plain`` and ``steps`` (three local steps on
the batch).

    python benchmarks/hunt_weight_norm.py                     # about four minutes on 2 cores
    python benchmarks/hunt_weight_norm.py --update weights

Results go to ``benchmarks/results/hunt_weight_norm.json`` (``hunt_weight_norm_weights.json``).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import torch
from hunt_common import hunt_batch, hunt_options
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

import fedleak

DATA = ("digits", "fashion-mnist", "lfw")
FORMS = {"parametrization": parametrizations.weight_norm, "hook": torch.nn.utils.weight_norm}


class Normed(nn.Module):
    def __init__(self, inputs: int, classes: int, depth: int, form: str, seed: int) -> None:
        super().__init__()
        widths = (inputs, *([256] * depth), classes)
        with warnings.catch_warnings():  # the older form is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            self.layers = nn.ModuleList(FORMS[form](nn.Linear(a, b)) for a, b in zip(widths, widths[1:]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("original0", "weight_g")):
                    p.mul_(torch.empty(p.shape).uniform_(0.5, 2.0, generator=gen))

    def forward(self, x):
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h))
        return self.layers[-1](h)


def twin(model: Normed) -> nn.Sequential:
    """Plain Linear layers with the weights the normalisation computes (a forward first: the older form sets each
    layer's weight in its forward)."""
    with torch.no_grad():
        model(torch.zeros(1, model.layers[0].in_features))
    parts: list[nn.Module] = [nn.Flatten()]
    for layer in model.layers:
        plain = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            plain.weight.copy_(layer.weight)
            plain.bias.copy_(layer.bias)
        parts += [plain, nn.ReLU()]
    return nn.Sequential(*parts[:-1]).eval()


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int | None, ground: str,
             seed: int) -> fedleak.GradientUpdate:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    named = {n: g for (n, _), g in zip(model.named_parameters(), grads)}
    gen = torch.Generator().manual_seed(seed)
    for name, g in named.items():
        if ground == "scaled" and name.endswith(("original0", "weight_g")):
            named[name] = g * 2
        elif ground == "scaled" and name.endswith(("original1", "weight_v")):
            named[name] = g / 2
        elif ground == "noised":
            named[name] = g + 1e-3 * g.abs().max() * torch.randn(g.shape, generator=gen)
    return fedleak.GradientUpdate(named, num_examples=size)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rate_known: bool, decay: float,
         ground: str) -> fedleak.WeightUpdate:
    """The client's local SGD steps (one, or three on the batch), the rate told to the server or not."""
    steps = 3 if ground == "steps" else 1
    change = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=steps, weight_decay=decay)
    return change if rate_known else replace(change, learning_rate=None)


def main() -> None:
    base, weights, out = hunt_options(__doc__, "hunt_weight_norm")
    update = "weights" if weights else "gradient"
    grounds = ("plain", "steps") if weights else ("plain", "scaled", "noised")
    torch.set_num_threads(1)
    totals = {"cells": 0, "certified": 0, "false": 0, "twin_certified": 0, "twin_false": 0, "differ": 0}
    by_ground = {g: {"cells": 0, "certified": 0, "false": 0} for g in grounds}
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        cells = itertools.product(FORMS, (1, 2), (1, 4, 8), (0, 1), (False, True), (True, False), grounds)
        for form, depth, size, rep, copies, sized, ground in cells:
            seed = base + rep
            torch.manual_seed(seed)
            model = Normed(data.x[0].numel(), data.num_classes, depth, form, seed).eval()
            x, y = hunt_batch(data, size, seed + 10, copies)
            other = twin(model)
            if weights:  # sized: the learning rate known
                decay = 5e-3 * rep
                rec = fedleak.reconstruct(model, step(model, x, y, sized, decay, ground), attack="exclusivity")
                rec_twin = fedleak.reconstruct(other, step(other, x, y, sized, decay, ground), attack="exclusivity")
            else:
                count = size if sized else None
                rec = fedleak.reconstruct(model, gradient(model, x, y, count, ground, seed))
                rec_twin = fedleak.reconstruct(other, gradient(other, x, y, count, "plain", seed))
            score, twin_score = fedleak.metrics.match(rec, x, y), fedleak.metrics.match(rec_twin, x, y)
            mine, theirs = set(score.certified_original.tolist()), set(twin_score.certified_original.tolist())
            differ = ground == "plain" and not mine <= theirs
            totals["cells"] += 1
            totals["certified"] += rec.num_certified
            totals["false"] += score.false_certificates
            totals["twin_certified"] += rec_twin.num_certified
            totals["twin_false"] += twin_score.false_certificates
            totals["differ"] += int(differ)
            for key, value in (("cells", 1), ("certified", rec.num_certified), ("false", score.false_certificates)):
                by_ground[ground][key] += value
            rows.append({"data": name, "form": form, "depth": depth, "batch": size, "repeat": rep, "copies": copies,
                         "rate_known" if weights else "sized": sized, "ground": ground,
                         "certified": rec.num_certified, "false": score.false_certificates,
                         "twin_certified": rec_twin.num_certified, "twin_false": twin_score.false_certificates,
                         "differ": differ})
        print(name, totals, by_ground, flush=True)
    meta = run_meta(f"python benchmarks/hunt_weight_norm.py --seed {base} --update {update}",
                    seed=base)
    write_results(out, meta=meta, totals=totals, by_ground=by_ground, rows=rows)
    print(totals, by_ground)


if __name__ == "__main__":
    main()
