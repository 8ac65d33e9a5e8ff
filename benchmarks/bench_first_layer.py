"""Benchmark of the first-layer attack on models the exact exclusivity route cannot read.

Models as users write them, none of which :func:`fedleak.nets.as_network` reads: GELU, tanh and leaky-ReLU MLPs,
a residual MLP and a LayerNorm MLP (784 -> 512 -> 10 on Fashion-MNIST, 625 -> 512 -> 2 on LFW faces), plus a
Dropout MLP its clients run in training mode. For ``--samples`` one-sample gradients of each: certified, exact
(max abs error <= 1e-4 of the data range, certified or not) and false certificates, the attack's time against the
client's own gradient (plain autograd, one thread), and what ``auto`` returned for the same update before it took
this route: Inverting Gradients within its 60 s budget (``--ig`` samples, PSNR). Batches of two: certified (none
may be). Then batches of 8 and 32 (``--batches`` each) read off the first layer's rows, uncertified
(:mod:`fedleak.attacks.first_layer_rows`): inputs returned, originals rebuilt exactly, labels, inputs that are none
of the batch's. Results go to ``benchmarks/results/first_layer.json`` and the tables to ``docs/benchmarks.md``.

    python benchmarks/bench_first_layer.py               # 20 samples per model and data set (about 6 minutes)
    python benchmarks/bench_first_layer.py --rows-only   # the batch rows only (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from doc_section import write_section
from run_meta import run_meta
from torch import nn
from torch.nn import functional as F

import fedleak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "first_layer.json"


class Net(nn.Module):
    """One hidden layer of ``width`` with the activation ``act``, optionally LayerNorm, a residual path, Dropout."""

    def __init__(self, d: int, width: int, classes: int, act: str, norm: bool = False, residual: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, classes)
        self.skip = nn.Linear(d, width, bias=False) if residual else None
        self.norm = nn.LayerNorm(width) if norm else None
        self.drop = nn.Dropout(dropout)
        self.act = act

    def forward(self, x):
        x = x.flatten(1)
        h = self.fc1(x)
        h = self.norm(h) if self.norm is not None else h
        h = {"gelu": F.gelu, "tanh": torch.tanh, "leaky": F.leaky_relu, "relu": F.relu}[self.act](h)
        h = h + self.skip(x) if self.skip is not None else h
        return self.fc2(self.drop(h))


MODELS = {
    "gelu": dict(act="gelu"),
    "tanh": dict(act="tanh"),
    "leaky-relu": dict(act="leaky"),
    "layernorm + relu": dict(act="relu", norm=True),
    "residual (relu + skip)": dict(act="relu", residual=True),
    "dropout 0.2, training mode": dict(act="relu", dropout=0.2),
}


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _client_ms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """The client's gradient, timed as a client computes it: plain autograd of the mean cross-entropy."""
    params = [p for p in model.parameters() if p.requires_grad]
    return _median_ms(lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params), repeats)


def run(data_name: str, samples: int, ig_samples: int, seed: int) -> list[dict]:
    data = fedleak.load_dataset(data_name)
    rows = []
    for name, kw in MODELS.items():
        torch.manual_seed(seed)
        model = Net(data.x[0].numel(), 512, data.num_classes, **kw)
        model.train(kw.get("dropout", 0) > 0)
        cert = exact = false = 0
        ratios, psnr_ig, ig_s = [], [], []
        for k in range(samples):
            x, y = data.batch(1, seed=seed * 1000 + k)
            update = fedleak.compute_gradient_update(model, x, y)
            rec = fedleak.reconstruct(model, update, attack="first-layer")
            s = fedleak.metrics.match(rec, x, y, data_range=data.value_range)
            cert += rec.num_certified
            lo, hi = data.value_range
            exact += int(len(rec) == 1 and float(s.max_abs_error[0]) <= 1e-4 * (hi - lo))  # certified or not
            false += int(s.false_certificate.sum())
            grad_ms = _client_ms(model, x, y, 5)
            att_ms = _median_ms(lambda: fedleak.reconstruct(model, update, attack="first-layer"), 3)
            ratios.append(att_ms / grad_ms)
            if k < ig_samples:  # what auto gave this update before: Inverting Gradients in its budget
                t = time.perf_counter()
                ig = fedleak.reconstruct(model, update, attack="ig", seed=0, time_budget=60.0, progress=False)
                ig_s.append(time.perf_counter() - t)
                psnr_ig.append(float(fedleak.metrics.match(ig, x, y, data_range=data.value_range).psnr[0]))
        x2, y2 = data.batch(2, seed=seed)
        two = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x2, y2), attack="first-layer")
        rows.append({"data": data.name, "model": name, "samples": samples, "certified": cert, "exact": exact,
                     "false_certificates": false, "attack_over_gradient": statistics.median(ratios),
                     "ig_psnr_median": statistics.median(psnr_ig) if psnr_ig else None,
                     "ig_seconds_median": statistics.median(ig_s) if ig_s else None,
                     "batch_of_two_certified": two.num_certified})
        print(rows[-1], flush=True)
    return rows


def run_batches(data_name: str, batches: int, sizes: tuple[int, ...], seed: int) -> list[dict]:
    """A batch's first-layer rows (uncertified): per model and batch size, ``batches`` batches; inputs returned,
    originals rebuilt exactly (each once), returned inputs that are none of the batch's, right labels, and the
    attack's time over the client's gradient."""
    data = fedleak.load_dataset(data_name)
    lo, hi = data.value_range
    rows = []
    for name, kw in MODELS.items():
        for m in sizes:
            row = {"data": data.name, "model": name, "batch": m, "batches": batches, "returned": 0, "exact": 0,
                   "blends": 0, "labels_right": 0, "certified": 0}
            ratios = []
            for k in range(batches):
                torch.manual_seed(seed * 1000 + k)
                model = Net(data.x[0].numel(), 512, data.num_classes, **kw)
                model.train(kw.get("dropout", 0) > 0)
                x, y = data.batch(m, seed=seed * 1000 + k)
                update = fedleak.compute_gradient_update(model, x, y)
                model.eval()
                t = time.perf_counter()
                rec = fedleak.reconstruct(model, update, attack="first-layer")
                att_ms = 1e3 * (time.perf_counter() - t)
                ratios.append(att_ms / _client_ms(model, x, y, 3))
                row["returned"] += len(rec)
                row["certified"] += rec.num_certified
                if len(rec):
                    err = torch.cdist(rec.inputs.reshape(len(rec), -1).double(), x.reshape(m, -1).double(),
                                      p=float("inf"))
                    near = err <= 1e-4 * (hi - lo)
                    row["exact"] += int(near.any(0).sum())
                    row["blends"] += int((~near.any(1)).sum())
                    row["labels_right"] += sum(int(rec.labels[j]) == int(y[int(err[j].argmin())])
                                               for j in range(len(rec)) if bool(near[j].any()))
            row["attack_over_gradient"] = statistics.median(ratios)
            rows.append(row)
            print(row, flush=True)
    return rows


def _batch_table(rows: list[dict]) -> str:
    lines = ["| data | model | batch | returned | exact (of the batch) | labels right | not in the batch | certified "
             "| attack / gradient |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        lines.append(f"| {r['data']} | {r['model']} | {r['batch']} | {r['returned']} | {r['exact']} / {n} "
                     f"| {r['labels_right']} | {r['blends']} | {r['certified']} | {r['attack_over_gradient']:.0f}x |")
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    lines = ["| data | model | samples | certified | exact | false cert. | attack / gradient | IG before: PSNR, s "
             "| batch of 2 certified |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ig = (f"{r['ig_psnr_median']:.1f} dB, {r['ig_seconds_median']:.0f} s" if r["ig_psnr_median"] is not None
              else "-")
        lines.append(f"| {r['data']} | {r['model']} | {r['samples']} | {r['certified']} | {r['exact']} "
                     f"| {r['false_certificates']} | {r['attack_over_gradient']:.0f}x | {ig} "
                     f"| {r['batch_of_two_certified']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--ig", type=int, default=1, help="samples per model also attacked by IG (60 s each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=3, help="batches per model and batch size for the batch rows")
    ap.add_argument("--rows-only", action="store_true", help="measure the batch rows only (the one-sample table and "
                    "its results are kept as they are)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kept = json.loads(RESULTS.read_text()) if args.rows_only and RESULTS.exists() else None
    rows = kept["rows"] if kept else [r for d in ("fashion-mnist", "lfw") for r in run(d, args.samples, args.ig,
                                                                                           args.seed)]
    batch_rows = [r for d in ("fashion-mnist", "lfw") for r in run_batches(d, args.batches, (8, 32), args.seed)]
    meta = run_meta(f"python benchmarks/bench_first_layer.py --samples {args.samples} --ig {args.ig} "
                    f"--batches {args.batches}", seed=args.seed, samples=args.samples, ig=args.ig, batches=args.batches)
    rows_meta = {**meta, "command": f"python benchmarks/bench_first_layer.py --rows-only --batches {args.batches}"}
    if kept:  # the one-sample table's measurement stays as it was
        meta = kept["meta"]
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows, "batch_rows": batch_rows, "batch_meta": rows_meta},
                                  indent=1))
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; one-sample "
            "FedSGD gradients of models written as `nn.Module` classes with one hidden layer of 512 (none of which "
            "the exclusivity attack reads); \"attack / gradient\": the median ratio of the attack's time to the "
            "client's gradient (plain autograd of its loss); \"IG before\": Inverting Gradients within `auto`'s 60 s "
            "budget on the first sample, what `auto` returned for these updates before. "
            f"Command: `{meta['command']}`._\n\n"
            f"{_table(rows)}")
    if not kept:
        write_section("first-layer", body, "First-layer attack (one-sample gradients of any model)")
        print(_table(rows))
    meta = rows_meta
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; gradients "
            f"of batches of 8 and 32 ({args.batches} batches each, batch size reported) of the same models, read "
            "off their first Linear layer's rows (`attack=\"first-layer\"`, uncertified); \"exact\": originals "
            "within 1e-4 of the data range of a returned input, each once; \"not in the batch\": returned inputs "
            "that are none of the batch's; \"attack / gradient\": the attack's time over the client's gradient "
            "(plain autograd of its loss); Dropout clients in training mode. Command: "
            f"`{meta['command']}`._\n\n{_batch_table(batch_rows)}")
    write_section("first-layer-rows", body, "First-layer rows of a batch (any model, uncertified)")
    print(_batch_table(batch_rows))


if __name__ == "__main__":
    main()
