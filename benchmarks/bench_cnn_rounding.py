"""CNN certificates under an update's rounding beyond a gradient's own float32 noise, which enters the conv inversion
as the features' proven error: one-step FedAvg weight changes at the rates clients use, a known transport error
(secure aggregation's quantization bound), and a dense head under weight normalisation.

Cells (each model and batch drawn from ``--seed``; certified, exact, false certificates, the worst certified
sample's measured error and the median bound the certificates state, both as fractions of the data range):

- ``fedavg``: the CNN of docs/cnn.md (``make_convnet((1, 28, 28), 10, channels=(6, 32), padding=1,
  fc_widths=(1024,))``, 25.7M parameters) on Fashion-MNIST, batches of 8, five seeds, one plain SGD step at
  learning rates 0.01, 0.05, 0.1 and 0.5, the rate not told;
- ``fedavg-user``: a user's CNN on two-class LFW (standardised inside ``forward``, ``F.pad`` before a 3 x 3 conv of 8
  channels, a second conv of 32, maps flattened channels-last, a head of 512), batches of 8, three seeds, one SGD
  step with momentum 0.9 and weight decay 5e-4 at rates 0.01 and 0.05;
- ``error``: the ``fedavg`` CNN's gradients (batches of 8, five seeds) with a known error of 0, 1e-9 and 1e-8 per
  entry;
- ``wn-head``: sklearn digits, a 3 x 3 conv of 4 or 8 channels then a head of 512, both under weight normalisation
  (each ``g`` scaled by 0.5 to 2), gradients and one-step changes at lr 0.1 of batches of 1, 2 and 4, three seeds,
  against its plain twin.

    python benchmarks/bench_cnn_rounding.py          # about three minutes on 2 cores

Results go to ``benchmarks/results/cnn_rounding.json``.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import torch
from run_meta import run_meta, seeded_arguments, write_results
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "cnn_rounding.json"


class UserLFW(nn.Module):
    """A CNN as a user writes it for two-class LFW faces (1 x 25 x 25)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 25 * 25, 512), nn.Linear(512, 2)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.conv1(F.pad(x, (1, 1, 1, 1))))
        x = F.relu(self.conv2(x))
        x = x.permute(0, 2, 3, 1).reshape(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class NormedCNN(nn.Module):
    """A conv and a dense head under weight normalisation, for 8 x 8 digits."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = parametrizations.weight_norm(nn.Conv2d(1, channels, 3, padding=1))
        self.fc1 = parametrizations.weight_norm(nn.Linear(channels * 64, 512))
        self.fc2 = nn.Linear(512, 10)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("original0"):
                    p.mul_(torch.empty(p.shape).uniform_(0.5, 2.0, generator=gen))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))

    def twin(self) -> nn.Sequential:
        plain = nn.Sequential(nn.Conv2d(1, self.conv.out_channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(self.fc1.in_features, 512), nn.ReLU(), nn.Linear(512, 10))
        with torch.no_grad():
            for mine, normed in ((plain[0], self.conv), (plain[3], self.fc1), (plain[5], self.fc2)):
                mine.weight.copy_(normed.weight)
                mine.bias.copy_(normed.bias)
        return plain


def scored(cell: str, setting: str, seed: int, rec: fedleak.Reconstruction, x: torch.Tensor, y: torch.Tensor
           ) -> dict:
    """One attack's row: certified, exact, false, the certified samples' worst measured error and their bounds (every
    data set here lies in [0, 1], so they are fractions of its range)."""
    score = fedleak.metrics.match(rec, x, y)
    flat = x.reshape(len(x), -1).double()
    errors, bounds = [], []
    for k in torch.nonzero(rec.certified).flatten().tolist():
        errors.append(float((flat - rec.inputs[k].reshape(-1).double()).abs().max(1).values.min()))
        bounds.append(float(rec.error_bounds[k]))
    return {"cell": cell, "setting": setting, "seed": seed, "batch": len(x), "certified": rec.num_certified,
            "exact": int(score.exact.sum()), "false": score.false_certificates, "errors": errors, "bounds": bounds}


#: the updates of the page's CNN: (cell, setting, the update of a model on a batch)
PAGE_CNN_UPDATES = (
    *(("fedavg", f"lr {lr}", lambda m, x, y, lr=lr: fedleak.fedavg_update(m, x, y, lr=lr))
      for lr in (0.01, 0.05, 0.1, 0.5)),
    *(("error", f"error {e:g}", lambda m, x, y, e=e: replace(fedleak.compute_gradient_update(m, x, y), error=e))
      for e in (0.0, 1e-9, 1e-8)),
)


def page_cnn_rows(seed: int) -> list[dict]:
    data = fedleak.load_dataset("fashion-mnist")
    rows = []
    for cell, setting, update_of in PAGE_CNN_UPDATES:
        for s in range(seed, seed + 5):
            x, y = data.batch(8, seed=s)
            model = fedleak.make_convnet((1, 28, 28), 10, channels=(6, 32), padding=1, fc_widths=(1024,), seed=s)
            rec = fedleak.reconstruct(model, update_of(model, x, y), attack="exclusivity", fallback="none")
            rows.append(scored(cell, setting, s, rec, x, y))
    return rows


def user_rows(seed: int) -> list[dict]:
    data = fedleak.load_dataset("lfw")
    rows = []
    for lr in (0.01, 0.05):
        for s in range(seed, seed + 3):
            x, y = data.batch(8, seed=100 + s)
            torch.manual_seed(s)
            model = UserLFW(float(x.mean()), float(x.std())).eval()
            change = fedleak.fedavg_update(model, x, y, lr=lr, optimizer="momentum", momentum=0.9,
                                           weight_decay=5e-4)
            rec = fedleak.reconstruct(model, change, attack="exclusivity", fallback="none")
            rows.append(scored("fedavg-user", f"lr {lr}", s, rec, x, y))
    return rows


def weight_norm_rows(seed: int) -> list[dict]:
    data = fedleak.load_dataset("digits")
    rows = []
    for channels in (4, 8):
        for s in range(seed, seed + 3):
            model = NormedCNN(channels, s).eval()
            for size in (1, 2, 4):
                x, y = data.batch(size, seed=1000 + 10 * s + size)
                for form, net in (("normalised", model), ("plain twin", model.twin().eval())):
                    for how, update in (("gradient", fedleak.compute_gradient_update(net, x, y)),
                                        ("lr 0.1", fedleak.fedavg_update(net, x, y, lr=0.1))):
                        rec = fedleak.reconstruct(net, update, attack="exclusivity", fallback="none")
                        rows.append(scored("wn-head", f"{form}, {how}", s, rec, x, y))
    return rows


def totals(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for key in dict.fromkeys((r["cell"], r["setting"]) for r in rows):
        mine = [r for r in rows if (r["cell"], r["setting"]) == key]
        errors = [e for r in mine for e in r["errors"]]
        bounds = [b for r in mine for b in r["bounds"]]
        out[" / ".join(key)] = {"samples": sum(r["batch"] for r in mine),
                                "certified": sum(r["certified"] for r in mine),
                                "exact": sum(r["exact"] for r in mine), "false": sum(r["false"] for r in mine),
                                "worst_certified_error": max(errors, default=None),
                                "median_bound": statistics.median(bounds) if bounds else None}
    return out


def main() -> None:
    args = seeded_arguments(__doc__, RESULTS)
    rows = page_cnn_rows(args.seed) + user_rows(args.seed) + weight_norm_rows(args.seed)
    summary = totals(rows)
    meta = run_meta(f"python benchmarks/bench_cnn_rounding.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, totals=summary, rows=rows)
    for name, t in summary.items():
        print(f"{name}: {t}")


if __name__ == "__main__":
    main()
