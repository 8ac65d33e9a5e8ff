"""OLIVE's sparsification side channel: label sets inferred from the positions a top-k client sends.

Fashion-MNIST; an MLP 784-1024-10 and Flower's quickstart CNN (28 x 28 images zero-padded to 32 x 32, grey
copied to RGB), each untrained and after ``--steps`` SGD steps (batch 64, learning rate 0.05) on the training
split. Clients hold batches of 8 or 32 test images with 1, 2 or 4 distinct labels (each present at least once)
or uniformly random labels, and send the ``top-k`` defense's update at ratios 0.1 %, 1 % and 10 %. The attacker
sees only the positions sent (the ``k`` the defense keeps, picked with ``torch.topk``). Rules
(:mod:`fedleak.attacks.index_labels`): the data-free output-layer rule and the profile rule (profiles from
``--profile-batches`` single-class batches of 8 training images per class), each sizing the set itself and,
separately, told the number of labels. Every predicted set is scored beside a random guess of a set of the same
size (exact expectation).

    .venv/bin/python benchmarks/bench_index_labels.py             # the full grid (100 batches per cell)
    .venv/bin/python benchmarks/bench_index_labels.py --quick     # a smoke run

Results (versions, seed, settings, every cell) go to ``benchmarks/results/index_labels.json``; the markdown
table is printed. Each (model, training state) runs in its own process with one torch thread.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "index_labels.json"
MODELS = ("mlp-1024", "flower-cnn")
RATIOS = (0.001, 0.01, 0.1)
BATCH_SIZES = (8, 32)
LABELS = (1, 2, 4, "random")
RULES = ("output-layer", "output-layer given", "profile", "profile given")


def build_model(name: str, seed: int):
    import torch

    import fedleak
    from fedleak.models.flower import FlowerNet

    if name == "mlp-1024":
        return fedleak.make_mlp((1, 28, 28), [1024], 10, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FlowerNet()


def model_inputs(name: str, x):
    """Images as the model takes them: the CNN wants 3 x 32 x 32."""
    from torch.nn import functional as F

    return F.pad(x, (2, 2, 2, 2)).expand(-1, 3, -1, -1) if name == "flower-cnn" else x


def draw(labels: np.ndarray, size: int, distinct: int | str, rng: np.random.Generator) -> np.ndarray:
    """Indices of a batch of ``size`` with ``distinct`` labels (each present at least once) or random labels."""
    if distinct == "random":
        ys = rng.integers(0, 10, size)
    else:
        classes = rng.choice(10, int(distinct), replace=False)
        ys = np.concatenate([classes, rng.choice(classes, size - int(distinct))])
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in ys])


def top_k_positions(update, kept: dict[float, int]) -> dict[float, dict]:
    """For each ratio, the positions the ``top-k`` defense sends (its ``k`` largest magnitudes over the whole
    update) per parameter. One sorted ``torch.topk`` serves every ratio; it is faster than the defense's exact
    tie-breaking, which only matters between entries of equal magnitude."""
    import torch

    flat = torch.cat([t.flatten() for t in update.values()]).abs()
    largest = torch.topk(flat, max(kept.values())).indices
    out = {}
    for ratio, k in kept.items():
        top, start, out[ratio] = largest[:k], 0, {}
        for name, t in update.items():
            out[ratio][name] = top[(top >= start) & (top < start + t.numel())] - start
            start += t.numel()
    return out


def train(model, name: str, x, y, steps: int, seed: int) -> None:
    import torch
    from torch.nn import functional as F

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(model_inputs(name, x[idx])), y[idx]).backward()
        optimizer.step()


def worker(name: str, trained: bool, args: argparse.Namespace) -> list[dict]:
    import torch

    import fedleak
    from fedleak.attacks.index_labels import build_index_profiles, infer_labels_from_indices, score_label_inference
    from fedleak.defenses.base import make_defense
    from fedleak.updates import batch_loss, trainable_parameters

    torch.set_num_threads(1)
    start = time.perf_counter()
    test, public = fedleak.load_dataset("fashion-mnist"), fedleak.load_dataset("fashion-mnist-train")
    model = build_model(name, args.seed)
    if trained:
        train(model, name, public.x, public.y, args.steps, args.seed)
    with torch.no_grad():
        accuracy = float((model(model_inputs(name, test.x)).argmax(1) == test.y).float().mean())
    profiles = build_index_profiles(model, model_inputs(name, public.x), public.y, RATIOS,
                                    batches=args.profile_batches, seed=args.seed)
    setup_s = time.perf_counter() - start
    params = trainable_parameters(model)
    total = sum(p.numel() for p in params.values())
    kept = {r: make_defense("top-k", ratio=r).kept(total) for r in RATIOS}
    labels = test.y.numpy()
    rows = []
    for size in BATCH_SIZES:
        for distinct in LABELS:
            cell_start = time.perf_counter()
            rng = np.random.default_rng([args.seed, size, 0 if distinct == "random" else int(distinct)])
            predicted: dict[tuple[float, str], list[tuple[int, ...]]] = {}
            true = []
            for _ in range(args.batches):
                idx = torch.from_numpy(draw(labels, size, distinct, rng))
                y = test.y[idx]
                loss = batch_loss(model, model_inputs(name, test.x[idx]), y)  # what compute_gradient_update
                update = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))  # returns, unchecked
                classes = sorted(set(y.tolist()))
                true.append(classes)
                for ratio, sent in top_k_positions(update, kept).items():
                    runs = {"output-layer": {}, "output-layer given": {"num_labels": len(classes)},
                            "profile": {"profile": profiles[ratio]},
                            "profile given": {"profile": profiles[ratio], "num_labels": len(classes)}}
                    for rule, options in runs.items():
                        predicted.setdefault((ratio, rule), []).append(
                            infer_labels_from_indices(model, sent, **options).labels)
            for ratio in RATIOS:
                rows.append({
                    "model": name, "trained": trained, "test_accuracy": accuracy, "ratio": ratio, "batch": size,
                    "labels": distinct, "batches": args.batches,
                    "mean_distinct": float(np.mean([len(t) for t in true])),
                    "scores": {rule: score_label_inference(predicted[ratio, rule], true, 10).to_dict()
                               for rule in RULES},
                    "seconds": (time.perf_counter() - cell_start) / len(RATIOS),
                })
            print(f"{name} {'trained' if trained else 'untrained'} batch {size} labels {distinct}: "
                  f"{time.perf_counter() - cell_start:.1f} s", flush=True)
    for row in rows:
        row["setup_seconds"] = setup_s
    return rows


def table(rows: list[dict]) -> str:
    """Exact-set accuracy and Jaccard of each rule, the random guess of the same size in brackets."""
    head = ("| model | trained (acc) | ratio | batch | labels | output layer: exact | Jaccard | given n: exact "
            "| profile: exact | Jaccard | given n: exact |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["scores"]

        def cell(rule: str, key: str) -> str:
            return f"{s[rule][key]:.2f} ({s[rule]['random_' + key]:.2f})"

        state = f"yes ({r['test_accuracy']:.2f})" if r["trained"] else f"no ({r['test_accuracy']:.2f})"
        lines.append(f"| {r['model']} | {state} | {r['ratio'] * 100:g} % | {r['batch']} | {r['labels']} | "
                     f"{cell('output-layer', 'exact')} | {cell('output-layer', 'jaccard')} | "
                     f"{cell('output-layer given', 'exact')} | {cell('profile', 'exact')} | "
                     f"{cell('profile', 'jaccard')} | {cell('profile given', 'exact')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, default=100, help="client batches per cell")
    ap.add_argument("--steps", type=int, default=200, help="SGD steps of the trained models")
    ap.add_argument("--profile-batches", type=int, default=16, help="single-class public batches per class")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="5 batches per cell, 4 profile batches: a smoke run (writes only with --out)")
    ap.add_argument("--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.profile_batches = 5, 4
    out = args.out or (None if args.quick else RESULTS)

    from fedleak.report.output import environment_info, write_json

    start = time.perf_counter()
    tasks = [(name, trained) for name in MODELS for trained in (False, True)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        futures = [pool.submit(worker, name, trained, args) for name, trained in tasks]
        rows = [row for future in futures for row in future.result()]
    rows.sort(key=lambda r: (MODELS.index(r["model"]), r["trained"], r["ratio"], r["batch"], str(r["labels"])))
    settings = {"models": list(MODELS), "ratios": list(RATIOS), "batch_sizes": list(BATCH_SIZES),
                "labels": [str(v) for v in LABELS], "batches": args.batches, "steps": args.steps,
                "profile_batches": args.profile_batches, "profile_batch_size": 8, "train_batch": 64,
                "learning_rate": 0.05, "workers": args.workers, "torch_threads": 1,
                "client_data": "fashion-mnist (test split)", "public_data": "fashion-mnist-train"}
    print(table(rows))
    print(f"\n{len(rows)} cells in {time.perf_counter() - start:.0f} s")
    if out is not None:
        write_json(out, {"benchmark": "index_labels", "seed": args.seed, "settings": settings,
                         "environment": environment_info(), "elapsed_seconds": time.perf_counter() - start,
                         "rows": rows})
        print(f"results in {out}")


if __name__ == "__main__":
    main()
