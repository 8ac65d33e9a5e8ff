"""A change of layout just before a Linear layer, folded into that layer: user classes that flatten their maps
channels-last (as models ported from Keras do) or a hidden layer's units transposed, against the same classes
flattening channel-major with the Linear layer's columns reordered to compute the same function (the twins).

Fashion-MNIST (the test split, which nothing in fedleak was tuned on). Models: a ``Conv2d`` of 4 channels (3 x 3,
padding 1) and a dense layer of 512 after ``a.permute(0, 2, 3, 1).reshape(n, -1)``; a ``Conv1d`` of 64 channels over
the image's rows as 28 channels of 28 steps, flattened time-major (``a.transpose(1, 2).contiguous().view(n, -1)``);
an MLP of 512 and 256 whose hidden units are viewed 16 x 32 and transposed. Per model, seed and batch size: the exact
attack on the client's gradient (with its batch size) and on its one-step weight change at learning rate 0.1 (with
the rate), for the model and its twin: certified, false certificates, whether the same samples certify and the
largest difference between the two's certified inputs; fishing of a batch of 16 on the CNN (fished, certified
after); and the attack's time on a batch of 4, model against twin, medians of 15 interleaved runs (torch on one
thread).

    python benchmarks/bench_layout_fold.py          # about half a minute on 2 cores

Results go to ``benchmarks/results/bench_layout_fold.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from run_meta import run_meta, seeded_arguments, write_results
from torch import nn
from torch.nn import functional as F
from twin_runs import print_report, timed_in_turn, twin_totals

import fedleak

RESULTS = Path(__file__).resolve().parent / "results" / "bench_layout_fold.json"


class ChannelsLast(nn.Module):
    def __init__(self, changed: bool) -> None:
        super().__init__()
        self.changed = changed
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 512)
        self.out = nn.Linear(512, 10)

    @staticmethod
    def change(a: torch.Tensor) -> torch.Tensor:
        return a.permute(0, 2, 3, 1).reshape(a.shape[0], -1)

    def forward(self, x):
        a = F.relu(self.conv(x))
        return self.out(F.relu(self.fc(self.change(a) if self.changed else a.flatten(1))))


class TimeMajor(nn.Module):
    def __init__(self, changed: bool) -> None:
        super().__init__()
        self.changed = changed
        self.conv = nn.Conv1d(28, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 28, 512)
        self.out = nn.Linear(512, 10)

    @staticmethod
    def change(a: torch.Tensor) -> torch.Tensor:
        return a.transpose(1, 2).contiguous().view(a.size(0), -1)

    def forward(self, x):
        a = F.relu(self.conv(x.reshape(x.shape[0], 28, 28)))
        return self.out(F.relu(self.fc(self.change(a) if self.changed else a.flatten(1))))


class Grid(nn.Module):
    def __init__(self, changed: bool) -> None:
        super().__init__()
        self.changed = changed
        self.hidden = nn.Linear(784, 512)
        self.fc = nn.Linear(512, 256)
        self.out = nn.Linear(256, 10)

    @staticmethod
    def change(a: torch.Tensor) -> torch.Tensor:
        return a.view(-1, 16, 32).transpose(1, 2).reshape(a.shape[0], -1)

    def forward(self, x):
        a = F.relu(self.hidden(x.flatten(1)))
        return self.out(F.relu(self.fc(self.change(a) if self.changed else a)))


MODELS = {"conv2d channels-last": (ChannelsLast, (4, 28, 28)), "conv1d time-major": (TimeMajor, (64, 28)),
          "mlp transposed units": (Grid, (512,))}


def pair(kind: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """The model and its twin: the same weights, the twin's ``fc`` columns in the maps' own order."""
    cls, maps = MODELS[kind]
    torch.manual_seed(seed)
    model, twin = cls(True).eval(), cls(False).eval()
    twin.load_state_dict(model.state_dict())
    order = cls.change(torch.arange(torch.Size(maps).numel()).reshape(1, *maps)).reshape(-1)
    with torch.no_grad():
        twin.fc.weight[:, order] = model.fc.weight
    return model, twin


def attack(model: nn.Module, update) -> fedleak.Reconstruction:
    return fedleak.reconstruct(model, update, attack="exclusivity", input_shape=(1, 28, 28))


def main() -> None:
    args = seeded_arguments(__doc__, RESULTS)
    data = fedleak.load_dataset("fashion-mnist")
    rows, timing, fishing = [], [], []
    for kind in MODELS:
        for seed in range(args.seed, args.seed + 3):
            model, twin = pair(kind, seed)
            for size in (1, 4, 8):
                x, y = data.batch(size, seed=100 + 10 * seed + size)
                x = x.reshape(size, 1, 28, 28)
                for update in ("gradient", "change"):
                    if update == "gradient":
                        u, ut = (fedleak.compute_gradient_update(m, x, y) for m in (model, twin))
                    else:
                        u, ut = (fedleak.fedavg_update(m, x, y, lr=0.1, local_steps=1, reveal_learning_rate=True)
                                 for m in (model, twin))
                    rec, read = attack(model, u), attack(twin, ut)
                    same = rec.certified.tolist() == read.certified.tolist()
                    diff = (float((rec.inputs[rec.certified] - read.inputs[read.certified]).abs().max())
                            if same and rec.num_certified else None)
                    rows.append({"model": kind, "seed": seed, "batch": size, "update": update,
                                 "certified": rec.num_certified, "twin_certified": read.num_certified,
                                 "false": fedleak.metrics.match(rec, x, y).false_certificates,
                                 "same_samples": same, "max_input_difference": diff})
        model, twin = pair(kind, args.seed)
        if kind.startswith("conv2d"):
            x, y = data.batch(16, seed=200)
            x = x.reshape(16, 1, 28, 28)
            for name, m in (("model", model), ("twin", twin)):
                fished = fedleak.fish(m, x, y)
                rec = attack(m, fedleak.compute_gradient_update(m, fished.inputs, y))
                fishing.append({"model": kind, "which": name, "batch": 16,
                                "fished": int(fished.certifiable_after.sum()), "certified": rec.num_certified,
                                "false": fedleak.metrics.match(rec, fished.inputs, y).false_certificates})
        x, y = data.batch(4, seed=300)
        x = x.reshape(4, 1, 28, 28)
        u, ut = (fedleak.compute_gradient_update(m, x, y) for m in (model, twin))
        timing.append({"model": kind, "batch": 4, **timed_in_turn({"model": lambda: attack(model, u),
                                                                     "twin": lambda: attack(twin, ut)})})
    totals = twin_totals(rows)
    meta = run_meta(f"python benchmarks/bench_layout_fold.py --seed {args.seed}", seed=args.seed)
    write_results(args.out, meta=meta, totals=totals, timing=timing, fishing=fishing, rows=rows)
    print_report(totals, timing, fishing, "changed")


if __name__ == "__main__":
    main()
