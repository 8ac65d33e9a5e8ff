"""Benchmark of batches drawn with replacement, as class-balancing clients draw them.

A client whose local data is skewed (a Dirichlet(0.5) share of the classes, as non-IID federated benchmarks split
data) balances its classes with ``torch.utils.data.WeightedRandomSampler`` (weights 1 / class count, with
replacement) in a ``DataLoader``: its batches often hold a sample of a rare class twice or more. A user's MLP (an
``nn.Module`` with ``x.view`` and ``F.relu``, 1024 hidden units, torch's default initialisation) on Fashion-MNIST's
train split and on two-class LFW crops (data the attacks were not tuned on); per cell ``--clients`` clients, each
sending the mean cross-entropy gradient of its first batch, batch size reported.

Per cell: batches, examples that repeat another of their batch, and for ``exclusivity`` and ``auto`` (``--budget``
seconds): certified samples, false certificates, examples some returned input matches at 40 dB PSNR or more
(near copies, matched one to one), returned inputs read off their scale (held at the batch's scale, or copies of an
input the batch holds more than once: ``read``) and those of them that are no sent example (``wrong``: within
``1e-3`` of none), the median seconds.

Results go to ``benchmarks/results/repeats.json`` and the table to docs/benchmarks.md; run the script on a previous
version of fedleak (``PYTHONPATH=<its src>``) with ``--out benchmarks/results/repeats_before.json`` and the table
shows both.

    python benchmarks/bench_repeats.py        # 12 clients per cell (about 6 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from bench_precision import UserMLP
from doc_section import write_section
from run_meta import run_meta, write_results
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import fedleak
from fedleak.attacks.exact.multiplicity import read_off_scale

RESULTS = Path(__file__).resolve().parent / "results" / "repeats.json"
BEFORE = RESULTS.with_name("repeats_before.json")
DATA = ("fashion-mnist-train", "lfw")
BATCHES = (8, 16)
ATTACKS = ("exclusivity", "auto")
LOCAL = 200  # examples a client holds
ALPHA = 0.5  # the Dirichlet concentration of a client's class shares


def client_batch(data: fedleak.Dataset, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first batch a class-balancing client's DataLoader gives: ``LOCAL`` examples drawn with class shares
    from Dirichlet(``ALPHA``), sampled with replacement by ``WeightedRandomSampler`` at 1 / class count."""
    rng = np.random.default_rng(seed)
    labels = data.y.numpy()
    classes = np.unique(labels)
    shares = rng.dirichlet([ALPHA] * len(classes))
    counts = np.maximum(rng.multinomial(LOCAL, shares), 1)  # every class at least once: a skewed, not missing, share
    index = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, counts)])
    x, y = data.x[index], data.y[index]
    weights = 1.0 / torch.bincount(y, minlength=len(classes)).double()[y]
    sampler = WeightedRandomSampler(weights, num_samples=len(y), replacement=True,
                                    generator=torch.Generator().manual_seed(seed))
    return next(iter(DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)))


def repeated_examples(x: torch.Tensor) -> int:
    """Examples of the batch equal to an earlier one."""
    flat = x.reshape(len(x), -1)
    return sum(bool((flat[:k] == flat[k]).all(1).any()) for k in range(1, len(flat)))


def score(model, update, x, y, attack: str, budget: float) -> dict:
    start = time.perf_counter()
    extra = {"budget": budget, "progress": False} if attack == "auto" else {}
    rec = fedleak.reconstruct(model, update, attack=attack, **extra)
    seconds = time.perf_counter() - start
    m = fedleak.metrics.match(rec, x, y)
    psnr = np.where(m.matched >= 0, np.nan_to_num(np.asarray(m.psnr, dtype=float), nan=0.0), 0.0)
    copies = [k for k, s in enumerate(rec.samples) if read_off_scale(s)]
    flat = x.reshape(len(x), -1)
    wrong = sum(float((flat - rec.inputs[k].reshape(1, -1)).abs().amax(1).min()) > 1e-3 for k in copies)
    return {"certified": int(rec.num_certified), "false": int(m.false_certificate.sum()),
            "near": int((psnr >= 40).sum()), "read": len(copies), "wrong": int(wrong), "seconds": seconds}


def cell(data: fedleak.Dataset, batch: int, clients: int, seed: int, budget: float) -> dict:
    out = {"data": data.name, "batch": batch, "batches": clients, "examples": 0, "repeats": 0}
    runs: dict[str, list[dict]] = {a: [] for a in ATTACKS}
    for k in range(clients):
        torch.manual_seed(seed + k)
        model = UserMLP((1024,), math.prod(data.input_shape), data.num_classes).eval()
        x, y = client_batch(data, batch, seed + 1000 * batch + k)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        update = fedleak.read_update(model, list(grads), num_examples=batch)
        out["examples"] += batch
        out["repeats"] += repeated_examples(x)
        for attack in ATTACKS:
            runs[attack].append(score(model, update, x, y, attack, budget))
    for attack, rs in runs.items():
        out[attack] = {key: sum(r[key] for r in rs) for key in ("certified", "false", "near", "read", "wrong")}
        out[attack]["seconds"] = float(np.median([r["seconds"] for r in rs]))
    return out


def _table(rows: list[dict], before: list[dict]) -> str:
    old = {(r["data"], r["batch"]): r for r in before}
    head = ["data", "batch", "examples (repeating)"]
    for attack in ATTACKS:
        head += [f"{attack}: certified", f"{attack}: near copies", f"{attack}: read off the scale (not sent)",
                 f"{attack}: median s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = old.get((r["data"], r["batch"]))
        cells = [r["data"], str(r["batch"]), f"{r['examples']} ({r['repeats']})"]
        for attack in ATTACKS:
            a, p = r[attack], (b or {}).get(attack)

            def was(key: str, fmt: str = "{}") -> str:
                return "" if p is None else f" (was {fmt.format(p[key])})"

            cells += [f"{a['certified']}{was('certified')}", f"{a['near']}{was('near')}",
                      f"{a['read']} ({a['wrong']})", f"{a['seconds']:.2f}{was('seconds', '{:.2f}')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=12, help="clients (batches) per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=5.0, help="auto's time budget per attack, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (the docs' table: from the default only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in DATA:
        data = fedleak.load_dataset(name)
        for batch in BATCHES:
            rows.append(cell(data, batch, args.clients, args.seed, args.budget))
            print(_table(rows[-1:], []).splitlines()[-1], flush=True)
    meta = run_meta(f"python benchmarks/bench_repeats.py --clients {args.clients} --seed {args.seed} "
                    f"--budget {args.budget:g}", seed=args.seed, clients=args.clients, budget=args.budget,
                    local_examples=LOCAL, dirichlet_alpha=ALPHA)
    write_results(args.out, meta=meta, rows=rows)
    before = json.loads(BEFORE.read_text())["rows"] if BEFORE.exists() and args.out != BEFORE else []
    if args.out == RESULTS:
        false = sum(r[a]["false"] for r in rows for a in ATTACKS)
        body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread; a user's "
                "`nn.Module` MLP (`x.view`, `F.relu`, 1024 hidden units) at torch's default initialisation; "
                f"{args.clients} clients per row, each holding {LOCAL} examples with Dirichlet({ALPHA:g}) class "
                "shares and sending the gradient of its first batch from a `DataLoader` with a class-balancing "
                "`WeightedRandomSampler` (with replacement); batch size reported. \"examples (repeating)\": the "
                "examples sent, and those equal to an earlier one of their batch; \"near copies\": sent examples "
                "some returned input matches at 40 dB PSNR or more, one to one; \"read off the scale (not sent)\": "
                "returned inputs held at the batch's scale or read as copies of an input the batch holds more than "
                "once, and those of them within 1e-3 of no sent example; "
                f"`auto` with a {args.budget:g} s budget. In brackets (was ...): the same run on the version before "
                f"inputs were read off their scale. False certificates: {false}. Command: `{meta['command']}`._\n\n"
                + _table(rows, before))
        write_section("repeats", body, "Batches drawn with replacement")
    print(_table(rows, before))


if __name__ == "__main__":
    main()
