"""A change of layout of the model's input: user classes that permute time series stored N x T x C before their first
layer, against the same classes without the permute on the data stored as their first layer reads it (the twins).

Synthetic signals of 3 channels (a sine per channel at the class's frequency, a random phase, noise; four classes),
stored N x T x C. Models: a ``Conv1d`` of 16 channels (kernel 5, padding 2) and a dense layer of 512 after
``x.permute(0, 2, 1)``; an MLP of 512 after ``(x.transpose(1, 2) - 0.5) / 0.25``. Per model, seed and batch size:
the exact attack on the client's gradient (with its batch size) and on its one-step weight change at learning rate 1
(with the rate), for the model and its twin: certified, false certificates, and the largest difference between the
two's certified inputs (in the stored layout); fishing of a batch of 16 (fished, certified after, L-inf); and the
attack's time on a batch of 4, model against twin, medians of 15 interleaved runs (torch on one thread).

    python benchmarks/bench_input_layout.py          # about ten seconds on 2 cores

Results go to ``benchmarks/results/bench_input_layout.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from run_meta import run_meta, seeded_arguments, write_results
from torch import nn
from torch.nn import functional as F
from twin_runs import print_report, timed_in_turn, twin_totals

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "bench_input_layout.json"
T, C, CLASSES = 32, 3, 4


def signals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals stored N x T x C in [0, 1], and their classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    t = torch.linspace(0, 1, T)
    freq = (y[:, None, None] + 1 + torch.arange(C)[None, :, None]).float()
    x = 0.5 + 0.4 * torch.sin(2 * math.pi * freq * t + 6 * torch.rand(n, C, 1, generator=gen))
    x = x + 0.05 * torch.randn(n, C, T, generator=gen)
    return x.clamp(0, 1).permute(0, 2, 1).contiguous(), y


class Conv(nn.Module):
    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.conv = nn.Conv1d(C, 16, 5, padding=2)
        self.fc = nn.Linear(16 * T, 512)
        self.out = nn.Linear(512, CLASSES)

    def forward(self, x):
        if self.permute:
            x = x.permute(0, 2, 1)
        return self.out(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


class Dense(nn.Module):
    def __init__(self, permute: bool) -> None:
        super().__init__()
        self.permute = permute
        self.fc = nn.Linear(T * C, 512)
        self.out = nn.Linear(512, CLASSES)

    def forward(self, x):
        if self.permute:
            x = x.transpose(1, 2)
        x = (x - 0.5) / 0.25
        return self.out(F.relu(self.fc(x.reshape(x.size(0), -1))))


MODELS = {"conv1d": Conv, "mlp": Dense}


def pair(kind: str, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = MODELS[kind](True)
    twin = MODELS[kind](False)
    twin.load_state_dict(model.state_dict())
    return model, twin


def attack(model: nn.Module, update, stored: tuple[int, ...]) -> fedleak.Reconstruction:
    return fedleak.reconstruct(model, update, attack="exclusivity", input_shape=stored)


def main() -> None:
    args = seeded_arguments(__doc__, RESULTS)
    rows, timing, fishing = [], [], []
    for kind in MODELS:
        for seed in range(args.seed, args.seed + 3):
            model, twin = pair(kind, seed)
            for size in (1, 4, 8):
                x, y = signals(size, 100 + seed)
                xt = x.transpose(1, 2).contiguous()
                for update in ("gradient", "change"):
                    if update == "gradient":
                        u, ut = (fedleak.compute_gradient_update(m, b, y) for m, b in ((model, x), (twin, xt)))
                    else:
                        u, ut = (fedleak.fedavg_update(m, b, y, lr=1.0, local_steps=1, reveal_learning_rate=True)
                                 for m, b in ((model, x), (twin, xt)))
                    rec, read = attack(model, u, (T, C)), attack(twin, ut, (C, T))
                    same = rec.certified.tolist() == read.certified.tolist()
                    diff = (float((rec.inputs[rec.certified] - read.inputs[read.certified].transpose(1, 2)).abs().max())
                            if same and rec.num_certified else None)
                    rows.append({"model": kind, "seed": seed, "batch": size, "update": update,
                                 "certified": rec.num_certified, "twin_certified": read.num_certified,
                                 "false": fedleak.metrics.match(rec, x, y).false_certificates,
                                 "same_samples": same, "max_input_difference": diff})
            x, y = signals(16, 200 + seed)
            for name, m, b in (("model", model, x), ("twin", twin, x.transpose(1, 2).contiguous())):
                fished = fedleak.fish(m, b, y)
                rec = attack(m, fedleak.compute_gradient_update(m, fished.inputs, y), tuple(b.shape[1:]))
                fishing.append({"model": kind, "seed": seed, "which": name, "batch": 16,
                                "fished": int(fished.certifiable_after.sum()), "certified": rec.num_certified,
                                "false": fedleak.metrics.match(rec, fished.inputs, y).false_certificates,
                                "linf": max(s.linf for s in fished.samples)})
        model, twin = pair(kind, args.seed)
        x, y = signals(4, 300)
        u = fedleak.compute_gradient_update(model, x, y)
        ut = fedleak.compute_gradient_update(twin, x.transpose(1, 2), y)
        timing.append({"model": kind, "batch": 4, **timed_in_turn({"model": lambda: attack(model, u, (T, C)),
                                                                     "twin": lambda: attack(twin, ut, (C, T))})})
    totals = twin_totals(rows)
    meta = run_meta(f"python benchmarks/bench_input_layout.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, totals=totals, timing=timing, fishing=fishing, rows=rows)
    print_report(totals, timing, fishing, "permuted")


if __name__ == "__main__":
    main()
