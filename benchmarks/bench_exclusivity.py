"""Benchmark of the exclusivity attack.

For batch sizes 1, 2, 4, ..., 256 and first-layer widths 256 to 4096 on digits and Fashion-MNIST:
the certifiable / recovered / exact fractions, false certificates and PSNR, and the time of the attack
(``fedleak.reconstruct`` of ``fedleak.compute_gradient_update``'s update, which reports the batch size as a
Flower client does) against the client's own gradient computation (plain autograd of the mean cross-entropy, as
a client computes it), both with torch pinned to one thread and timed interleaved. Each (data set, width) runs in
its own process so that its peak memory (max RSS) is recorded. Results go to
``benchmarks/results/exclusivity.json`` and the markdown table to ``docs/benchmarks.md`` (between the
``exclusivity`` markers).

    python benchmarks/bench_exclusivity.py                 # full grid (about 4 minutes on 2 cores)
    python benchmarks/bench_exclusivity.py --quick         # a small grid for a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from doc_section import write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "exclusivity.json"
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
WIDTHS = [256, 512, 1024, 2048, 4096]
DATASETS = ["digits", "fashion-mnist"]


def _interleaved(fns, repeats: int) -> tuple[list[float], list[object]]:
    """Each function's median time over ``repeats`` rounds in which they run in turn (the machine's load touches
    them alike), and its last result."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None for _ in fns]
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            outs[j] = fn()
            times[j].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times], outs


def worker(dataset: str, width: int, trials: int, repeats: int, seed: int) -> list[dict]:
    import torch

    import fedleak
    from fedleak import metrics

    torch.set_num_threads(1)  # as the attack pins itself: the ratio compares like with like
    data = fedleak.load_dataset(dataset)
    rows = []
    for m in BATCHES:
        for trial in range(trials):
            model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=seed + trial)
            x, y = data.batch(m, seed=seed * 1000 + 17 * m + trial)
            names = [n for n, _ in model.named_parameters()]
            params = list(model.parameters())

            def client() -> dict:  # the client's gradient: plain autograd, as a client computes it
                loss = torch.nn.functional.cross_entropy(model(x), y)
                return dict(zip(names, torch.autograd.grad(loss, params)))

            client()  # warm-up
            update = fedleak.compute_gradient_update(model, x, y)  # the gradient and the batch size, as sent
            fedleak.reconstruct(model, update)  # warm-up (the model is read once)
            (grad_s, attack_s), (_, rec) = _interleaved([client, lambda: fedleak.reconstruct(model, update)],
                                                        repeats)
            report = fedleak.analyze_exclusivity(model, x, y)
            scores = metrics.match(rec, x, y, data_range=data.value_range)
            rec_psnr = scores.psnr[scores.recovered]
            rows.append({
                "dataset": dataset, "width": width, "batch_size": m, "trial": trial,
                "gradient_ms": 1000 * grad_s, "attack_ms": 1000 * attack_s,
                "certifiable": int(report.certifiable.sum()), "recovered": int(scores.recovered.sum()),
                "exact": int(scores.exact.sum()), "certified": rec.num_certified,
                "false_certificates": scores.false_certificates,
                "missed_certifiable": int((report.certifiable & ~scores.recovered).sum()),
                "psnr_recovered": float(rec_psnr.mean()) if len(rec_psnr) else None,
                "inferred_batch_size": rec.batch_size,
            })
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in rows:
        r["peak_rss_mb"] = rss_mb
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        "| data | width | batch | certifiable | recovered (certified, exact) | exact incl. uncertified | false cert. "
        "| missed certifiable | client gradient ms | attack ms | attack / gradient | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["dataset"], r["width"], r["batch_size"]) for r in rows},
                  key=lambda k: (DATASETS.index(k[0]), k[1], k[2]))
    for ds, w, m in keys:
        g = [r for r in rows if (r["dataset"], r["width"], r["batch_size"]) == (ds, w, m)]
        n = sum(r["batch_size"] for r in g)
        grad = statistics.median(r["gradient_ms"] for r in g)
        att = statistics.median(r["attack_ms"] for r in g)
        lines.append(
            f"| {ds} | {w} | {m} | {100 * sum(r['certifiable'] for r in g) / n:.0f}% "
            f"| {100 * sum(r['recovered'] for r in g) / n:.0f}% | {100 * sum(r['exact'] for r in g) / n:.0f}% "
            f"| {sum(r['false_certificates'] for r in g)} | {sum(r['missed_certifiable'] for r in g)} "
            f"| {grad:.1f} | {att:.1f} | {att / grad:.1f} | {g[0]['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def _write_doc(rows: list[dict], meta: dict) -> None:
    body = (f"_Measured {meta['date']} on {meta['machine']}; torch {meta['torch']} pinned to one thread, "
            f"{meta['trials']} batch(es) per cell; times are medians of {meta['repeats']} interleaved runs of the "
            "client's gradient (plain autograd of the mean cross-entropy) and the attack (`fedleak.reconstruct` of "
            "`compute_gradient_update`'s update, which reports the batch size; after one warm-up call that reads "
            "the model), and a cell's the median over its batches. "
            f"Command: `{meta['command']}`._\n\n{_table(rows)}")
    write_section("exclusivity", body, "Exclusivity attack (FedSGD, fully connected ReLU nets)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid: widths 256,1024; batches up to 64")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", nargs=2, metavar=("DATASET", "WIDTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global BATCHES, WIDTHS
    if args.quick:
        BATCHES, WIDTHS = [1, 4, 16, 64], [256, 1024]
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.trials, args.repeats, args.seed)))
        return
    rows: list[dict] = []
    for ds in DATASETS:
        for w in WIDTHS:
            cmd = [sys.executable, __file__, "--worker", ds, str(w), "--trials", str(args.trials),
                   "--repeats", str(args.repeats), "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.extend(json.loads(out.strip().splitlines()[-1]))
            print(f"{ds} width {w}: done", file=sys.stderr)
    from run_meta import run_meta, write_results  # (imports torch: the cells run in their own processes)

    meta = run_meta("python benchmarks/bench_exclusivity.py" + (" --quick" if args.quick else ""), trials=args.trials,
                    repeats=args.repeats, seed=args.seed)
    write_results(RESULTS, meta=meta, rows=rows)
    _write_doc(rows, meta)
    print(_table(rows))


if __name__ == "__main__":
    main()
