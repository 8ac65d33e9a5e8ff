"""Benchmark of exclusivity reduction (the client-side defense) on models at initialisation and after training.

A model as users write it (an ``nn.Module`` with ``x.view`` and ``F.relu``, 1024 hidden units, torch's default
initialisation), either as initialised or after ``--steps`` SGD steps (batch 64, learning rate 0.1, momentum 0.9)
on the data set its batches come from (a client's batches are its training data: after training, some of them
are classified almost surely, and their loss gradient is about zero). Per cell, ``--seeds`` batches of 16:

- the exact attack on the undefended batch: certified;
- the defense (``ExclusivityReduction()``, its defaults): samples dropped, mean L-infinity perturbation of the
  kept ones, seconds;
- the exact attack on the defended batch: certified (false certificates counted against what was sent), sent
  samples rebuilt exactly (some returned input within 1e-4 of the data range, certified or not), and sent samples
  some returned input matches at 40 dB PSNR or more (a near copy) and at 20 dB or more.

Then the CNN of docs/cnn.md (``make_convnet``, convs of 6 and 32 channels, padding 1, one dense hidden layer) at
initialisation on Fashion-MNIST (head 1024), LFW (512) and digits (256): one batch of 8 per model seed (5, 4 and 6
seeds), the same measurements.

Then two studies on Fashion-MNIST: the defense on larger batches (32, 64, 128) of ``make_mlp(..., [1024])`` at
initialisation (certificates left, perturbation, seconds), and its utility: test accuracy of an MLP 784-256-10
after 60 SGD steps (lr 0.1) of batch 32 on Fashion-MNIST-train with and without the defense on the same batches,
scored on the test split (as the model trains, confident samples appear, which the defense drops).

Results go to ``benchmarks/results/reduction.json`` and the tables to docs/benchmarks.md.

    python benchmarks/bench_reduction.py              # 6 batches per cell (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from doc_section import write_section
from run_meta import run_meta, write_results
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.defenses import ExclusivityReduction

RESULTS = Path(__file__).resolve().parent / "results" / "reduction.json"
CELLS = [("fashion-mnist", 0), ("fashion-mnist", 300), ("digits", 0), ("digits", 300), ("lfw", 0), ("lfw", 300)]
BATCH = 16
CNN_CELLS = [("fashion-mnist", 1024, 5), ("lfw", 512, 4), ("digits", 256, 6)]  # data, dense head, model seeds
CNN_BATCH = 8


class UserMLP(nn.Module):
    def __init__(self, d: int, width: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.shape[0], -1))))


def trained(data: fedleak.Dataset, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = UserMLP(int(np.prod(data.input_shape)), 1024, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data.y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()
    return model.eval()


def _matches(rec: fedleak.Reconstruction, sent: torch.Tensor, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Per sent sample: the smallest max-abs error and the best PSNR of any returned input against it."""
    if len(rec) == 0:
        return np.full(len(sent), np.inf), np.zeros(len(sent))
    R = rec.inputs.reshape(len(rec), -1).double()
    S = sent.reshape(len(sent), -1).double()
    diff = R[:, None, :] - S[None, :, :]
    err = diff.abs().amax(-1).amin(0).numpy()
    mse = diff.pow(2).mean(-1).amin(0).clamp_min(1e-300)
    return err, (10 * torch.log10(width**2 / mse)).numpy()


def cell(data: fedleak.Dataset, steps: int, seeds: int, seed: int) -> dict:
    model = trained(data, steps, seed)
    row = _row(data, f"trained, {steps} steps" if steps else "at initialisation", BATCH, seeds)
    for k in range(seeds):
        _defend_and_attack(model, *data.batch(BATCH, seed=seed + 50 + k), data, row)
    return _finish(row)


def cnn_cell(data: fedleak.Dataset, head: int, seeds: int) -> dict:
    """docs/cnn.md's CNN (convs of 6 and 32 channels, padding 1, one hidden dense layer of ``head``) at
    initialisation, one batch of :data:`CNN_BATCH` per model seed (the batch drawn with the same seed)."""
    row = _row(data, f"CNN (6, 32) + {head}, at initialisation", CNN_BATCH, seeds)
    for k in range(seeds):
        model = fedleak.make_convnet(data.input_shape, data.num_classes, channels=(6, 32), padding=1,
                                     fc_widths=(head,), seed=k)
        _defend_and_attack(model, *data.batch(CNN_BATCH, seed=k), data, row)
    return _finish(row)


def _row(data: fedleak.Dataset, model: str, batch: int, batches: int) -> dict:
    return dict(data=data.name, model=model, batch=batch, batches=batches, confident=0, certified_before=0,
                dropped=0, sent=0, certified=0, false=0, exact=0, near_copies=0, leaked20=0, linf=[], seconds=[])


def _defend_and_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: fedleak.Dataset, row: dict) -> None:
    """One batch: the exact attack on it undefended, the defense, the exact attack on what the client sends."""
    width = data.value_range[1] - data.value_range[0]
    with torch.no_grad():
        row["confident"] += int((torch.softmax(model(x), 1)[torch.arange(len(y)), y] > 0.999).sum())
    undefended = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    row["certified_before"] += undefended.num_certified
    defense = ExclusivityReduction()
    t0 = time.perf_counter()
    xd, yd = defense(model, x, y)
    row["seconds"].append(time.perf_counter() - t0)
    res = defense.last_result
    row["dropped"] += len(y) - len(res.kept)
    row["sent"] += len(res.kept)
    row["linf"] += [s.linf for s in res.samples if s.status != "dropped"]
    if not len(xd):
        return
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, xd, yd))
    row["certified"] += rec.num_certified
    row["false"] += fedleak.metrics.match(rec, xd, yd, data_range=data.value_range).false_certificates
    err, psnr = _matches(rec, xd, width)
    row["exact"] += int((err <= 1e-4 * width).sum())
    row["near_copies"] += int((psnr >= 40).sum())
    row["leaked20"] += int((psnr >= 20).sum())


def _finish(row: dict) -> dict:
    row["linf_mean"] = float(np.mean(row.pop("linf"))) if row["sent"] else None
    row["seconds_median"] = float(np.median(row.pop("seconds")))
    return row


def large_batch(data: fedleak.Dataset, batch: int, seed: int) -> dict:
    """The defense on a clean batch of a model at initialisation: certificates left, perturbation, time."""
    model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=seed)
    x, y = data.batch(batch, seed=seed + 1)
    defense = ExclusivityReduction()
    t0 = time.perf_counter()
    xd, yd = defense(model, x, y)
    seconds = time.perf_counter() - t0
    kept = [s.linf for s in defense.last_result.samples if s.status != "dropped"]
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, xd, yd)) if len(xd) else None
    return dict(batch=batch, seconds=seconds, dropped=batch - len(kept),
                linf_mean=float(np.mean(kept)) if kept else None, certified=rec.num_certified if rec else 0)


def utility(train: fedleak.Dataset, test: fedleak.Dataset, defend: bool, seed: int, steps: int = 60,
            batch: int = 32, lr: float = 0.1) -> dict:
    """Test accuracy after ``steps`` SGD steps of batch ``batch`` (one FedSGD client) with and without the defense,
    on the same batches."""
    model = fedleak.make_mlp(train.input_shape, [256], train.num_classes, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    linf, dropped, seconds = [], 0, 0.0
    for step in range(steps):
        x, y = train.batch(batch, seed=seed * 100000 + step)
        if defend:
            defense = ExclusivityReduction()
            t0 = time.perf_counter()
            x, y = defense(model, x, y)
            seconds += time.perf_counter() - t0
            dropped += batch - len(x)
            linf += [s.linf for s in defense.last_result.samples if s.status != "dropped"]
            if not len(x):
                continue
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    return dict(defend=defend, steps=steps, batch=batch, lr=lr, test_accuracy=accuracy,
                linf_mean=float(np.mean(linf)) if linf else 0.0, dropped=dropped, seconds=seconds)


def _table(rows: list[dict]) -> str:
    lines = ["| data | model | confident (p > 0.999) | certified undefended | dropped | mean L-inf of the sent | "
             "certified after | exact after | near copies (>= 40 dB) | >= 20 dB | defense s (median) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = r["batch"] * r["batches"]
        model = r["model"]
        linf = f"{r['linf_mean']:.3f}" if r["linf_mean"] is not None else "-"
        lines.append(f"| {r['data']} | {model} | {r['confident']} / {n} | {r['certified_before']} / {n} | "
                     f"{r['dropped']} | {linf} | {r['certified']} / {r['sent']} | {r['exact']} / {r['sent']} | "
                     f"{r['near_copies']} / {r['sent']} | {r['leaked20']} / {r['sent']} | {r['seconds_median']:.1f} |")
    return "\n".join(lines)


def _studies(large: list[dict], use: list[dict]) -> str:
    batches = "; ".join(f"batch {r['batch']}: {r['certified']} certified, {r['dropped']} dropped, mean L-inf "
                        f"{r['linf_mean']:.4f}, {r['seconds']:.2f} s" for r in large)
    plain, defended = use
    return (f"Larger batches (Fashion-MNIST, `make_mlp(..., [1024])` at initialisation): {batches}. Utility (an MLP "
            f"784-256-10, {plain['steps']} SGD steps of batch {plain['batch']} at lr {plain['lr']:g} on "
            f"Fashion-MNIST-train, the same batches, scored on the test split): {100 * plain['test_accuracy']:.2f}% "
            f"without the defense, {100 * defended['test_accuracy']:.2f}% with it ({defended['dropped']} samples "
            f"dropped, mean L-inf {defended['linf_mean']:.4f}, {defended['seconds']:.1f} s of defense in all).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="batches per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' tables: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded: dict[str, fedleak.Dataset] = {}
    rows = []
    for name, steps in CELLS:
        rows.append(cell(loaded.setdefault(name, fedleak.load_dataset(name)), steps, args.seeds, args.seed))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    for name, head, seeds in CNN_CELLS:
        rows.append(cnn_cell(loaded.setdefault(name, fedleak.load_dataset(name)), head, seeds))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    fm = loaded.get("fashion-mnist") or fedleak.load_dataset("fashion-mnist")
    large = [large_batch(fm, b, args.seed) for b in (32, 64, 128)]
    train = fedleak.load_dataset("fashion-mnist-train")
    use = [utility(train, fm, defend, args.seed) for defend in (False, True)]
    meta = run_meta(f"python benchmarks/bench_reduction.py --seeds {args.seeds} --seed {args.seed}", seed=args.seed,
                    seeds=args.seeds)
    write_results(args.out, meta=meta, rows=rows, large_batches=large, utility=use)
    if args.out == RESULTS:
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a "
                "user's `nn.Module` (`x.view`, `F.relu`, 1024 hidden units), at torch's default initialisation or "
                "trained on the data set its batches come from (SGD, batch 64, lr 0.1, momentum 0.9), "
                f"{args.seeds} batches of {BATCH} per row; and the CNN of [cnn.md](cnn.md) (`make_convnet`, convs of "
                f"6 and 32 channels, padding 1) at initialisation, one batch of {CNN_BATCH} per model seed; "
                "`ExclusivityReduction()` with its defaults; \"exact\": "
                "some returned input (certified or not) within 1e-4 of the data range of a sent sample; \"near "
                "copies\" / \">= 20 dB\": sent samples some returned input matches at that PSNR. False "
                f"certificates: {sum(r['false'] for r in rows)}. Command: `{meta['command']}`._\n\n{_table(rows)}\n\n"
                f"{_studies(large, use)}")
        write_section("reduction", body, "Exclusivity reduction on trained models")
    print(_table(rows))


if __name__ == "__main__":
    main()
