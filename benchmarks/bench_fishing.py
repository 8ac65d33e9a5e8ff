"""Fishing benchmark: recovered fraction before and after fishing, perturbation PSNR, and time as multiples of the
client's own gradient time and of the LP floor, per data set, batch size and depth/widths; the trade-off curve
under a PSNR floor; optional LP solver and formulation studies (the defense: bench_reduction.py).

    .venv/bin/python benchmarks/bench_fishing.py --out benchmarks/results/fishing_depth.json   # default grid
    .venv/bin/python benchmarks/bench_fishing.py --quick                                        # smoke run
    .venv/bin/python benchmarks/bench_fishing.py --cells fashion-mnist:256:1024,lfw:64:1024-256 --workers 1

A cell is ``data:M:widths[:min_psnr]`` (widths joined by ``-``: ``1024-256`` is two hidden layers). Each model is
``make_mlp(shape, widths, classes, seed)`` at PyTorch's default initialisation and each batch ``Dataset.batch(M,
seed + 1)``. Results (JSON, written atomically after every cell) record versions, seed, settings and the machine;
the markdown tables printed at the end are the ones in docs/fishing.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fedleak
from fedleak.fishing import fish
from fedleak.fishing.head_arrays import HeadArrays
from fedleak.fishing.lp import LPSettings, RadiusLP
from fedleak.nets import as_network

torch.set_num_threads(1)


def attack_scores(model, inputs, labels, originals):
    t0 = time.perf_counter()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, inputs, labels))
    secs = time.perf_counter() - t0
    vs_sent = fedleak.metrics.match(rec, inputs, labels)
    vs_orig = fedleak.metrics.match(rec, originals, labels) if originals is not None else vs_sent
    return rec, vs_sent, vs_orig, secs


def gradient_seconds(model, x, y, repeats=5):
    """The client's own cost: median wall time of one FedSGD gradient of the batch (plain autograd)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fedleak.compute_gradient_update(model, x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cell(name, data, batch, widths, seed, min_psnr=None, workers=None):
    model = fedleak.make_mlp(data.input_shape, list(widths), data.num_classes, seed=seed)
    x, y = data.batch(batch, seed=seed + 1)
    grad_s = gradient_seconds(model, x, y)
    _, plain, _, _ = attack_scores(model, x, y, None)
    t0 = time.perf_counter()
    res = fish(model, x, y, min_psnr=min_psnr, workers=workers)
    fish_secs = time.perf_counter() - t0
    _, fished, fished_orig, attack_secs = attack_scores(model, res.inputs, y, x)
    fished_psnr = [s.psnr for s in res.samples if s.status == "fished" and s.perturbed]
    return dict(
        dataset=name, batch=batch, widths=list(widths), depth=len(widths), seed=seed, min_psnr=min_psnr,
        workers=workers, plain_recovered=plain.recovered_fraction,
        fished_recovered=fished.recovered_fraction, false_certificates=int(fished.false_certificate.sum()),
        fished_condition=float(res.certifiable_after.mean()),
        statuses=dict(collections.Counter(s.status for s in res.samples)),
        moved_aside=int(sum(s.perturbed and s.status != "fished" for s in res.samples)),
        psnr_fished_mean=float(np.mean(fished_psnr)) if fished_psnr else float("nan"),
        psnr_fished_min=float(np.min(fished_psnr)) if fished_psnr else float("nan"),
        psnr_all_mean=float(np.mean([s.psnr for s in res.samples])),
        psnr_rec_vs_original=float(fished_orig.mean_psnr()),
        linf_mean=float(res.linf.mean()), linf_max=float(res.linf.max()),
        fish_s=fish_secs, lp_s=res.lp_seconds, lp_floor_s=res.lp_floor_seconds, gradient_s=grad_s,
        lp_solves=int(sum(s.lp_solves for s in res.samples)),
        lp_rows_mean=float(np.mean([s.lp_rows for s in res.samples])), attack_s=attack_secs,
    )


def solver_comparison(data, batch=16, width=1024, seed=0):
    """Same batch, each registered backend; plus the 2·d-row L-inf formulation on the final rows."""
    out = []
    model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=seed)
    x, y = data.batch(batch, seed=seed + 1)
    for solver in sorted(fedleak.fishing.available_solvers()):
        t0 = time.perf_counter()
        res = fish(model, x, y, solver=solver, norm="linf")
        out.append(dict(solver=solver, seconds=time.perf_counter() - t0, lp_s=res.lp_seconds,
                        condition=float(res.certifiable_after.mean()), linf_mean=float(res.linf.mean())))
    return out


def formulation_comparison(data, batch=64, width=1024, seed=0, samples=4):
    """Minimal L-inf radius for the rows of a fished batch: our dual Newton (box in the bounds) vs the
    textbook LP with 2·d norm rows (scipy HiGHS dual simplex and IPM)."""
    from scipy.optimize import linprog

    model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=seed)
    x, y = data.batch(batch, seed=seed + 1)
    res = fish(model, x, y, norm="linf")
    A = HeadArrays(as_network(model, inputs=x).head)
    X = x.reshape(batch, -1).double().numpy()
    Z = A.preacts(X)[0]
    kap = res.options.margin
    rows = []
    for m in range(samples):
        own = list(res.samples[m].targets[0])
        others = [j for s in res.samples if s.index != m for j in s.targets[0]]
        others = [j for j in others if Z[m, j] > -2 * kap]
        V = np.vstack([A.W[0][own], -A.W[0][others]]) if others else A.W[0][own]
        C = np.r_[kap - A.b[0][own], kap + A.b[0][others]] if others else kap - A.b[0][own]
        t0 = time.perf_counter()
        lp = RadiusLP(X[m], LPSettings())
        lp.add(V, C)
        _, t_newton, _ = lp.radius()
        newton_s = time.perf_counter() - t0
        d = X.shape[1]
        eye = np.eye(d)
        Aub = np.vstack([np.c_[-V, np.zeros(len(C))], np.c_[eye, -np.ones(d)], np.c_[-eye, -np.ones(d)]])
        bub = np.r_[-C, X[m], -X[m]]
        entry = dict(rows=len(C), newton_t=t_newton, newton_s=newton_s, newton_lps=lp.solves)
        for method in ("highs-ds", "highs-ipm"):
            t0 = time.perf_counter()
            r = linprog(np.r_[np.zeros(d), 1.0], A_ub=Aub, b_ub=bub, bounds=[(0, 1)] * d + [(0, None)], method=method)
            entry[f"{method}_s"] = time.perf_counter() - t0
            entry[f"{method}_t"] = float(r.fun) if r.status == 0 else float("nan")
        rows.append(entry)
    return rows


def write_atomic(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, path)


def table(rows):
    head = ("| data | M | widths | PSNR floor | plain rec. | fished rec. | false cert. | PSNR fished (mean / min) "
            "| not fished (moved / unperturbed) | fish s | × gradient | × LP floor |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        nf = sum(v for k, v in r["statuses"].items() if k != "fished")
        floor = "–" if r["min_psnr"] is None else f"{r['min_psnr']:g} dB"
        lines.append(
            f"| {r['dataset']} | {r['batch']} | {'-'.join(map(str, r['widths']))} | {floor} "
            f"| {r['plain_recovered']:.3f} "
            f"| {r['fished_recovered']:.3f} | {r['false_certificates']} | {r['psnr_fished_mean']:.1f} / "
            f"{r['psnr_fished_min']:.1f} | {nf} ({r['moved_aside']} / {nf - r['moved_aside']}) | {r['fish_s']:.2f} "
            f"| {r['fish_s'] / r['gradient_s']:,.0f} | {r['fish_s'] / max(r['lp_floor_s'], 1e-9):.1f} |"
        )
    return "\n".join(lines)


DEFAULT_GRID = (
    # one hidden layer: batch size and width
    [f"fashion-mnist:{m}:1024" for m in (32, 64, 128, 256)]
    + [f"fashion-mnist:128:{w}" for w in (512, 2048, 4096)]
    + [f"lfw:{m}:1024" for m in (64, 128, 256)]
    + [f"mni152:{m}:1024" for m in (64, 128)]
    # two and three hidden layers, the last at least 4·M wide
    + [f"{d}:64:1024-256" for d in ("fashion-mnist", "lfw", "mni152")]
    + [f"{d}:128:2048-512-512" for d in ("fashion-mnist", "lfw", "mni152")]
    # the trade-off curve: fished fraction against a PSNR floor and the batch size
    + [f"fashion-mnist:{m}:1024:{p}" for m in (64, 128, 256) for p in (25, 30, 35, 40)]
)
QUICK_GRID = ["fashion-mnist:32:1024", "lfw:32:512-128", "fashion-mnist:64:1024:35"]


def parse_cell(cell: str):
    parts = cell.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"bench_fishing: a cell is data:M:widths[:min_psnr], got {cell!r}")
    widths = tuple(int(w) for w in parts[2].split("-"))
    return parts[0], int(parts[1]), widths, (float(parts[3]) if len(parts) == 4 else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", default=None, help="comma-separated data:M:widths[:min_psnr] cells instead of the grid")
    ap.add_argument("--workers", type=int, default=None, help="fishing processes (default: one per core)")
    ap.add_argument("--extra", action="store_true", help="also the solver and formulation studies")
    args = ap.parse_args(argv)
    cells = args.cells.split(",") if args.cells else (QUICK_GRID if args.quick else DEFAULT_GRID)
    grid = [parse_cell(c) for c in cells]
    available = fedleak.available_datasets()
    sets = {}
    for name, *_ in grid:
        if name not in sets and name in available:
            try:
                sets[name] = fedleak.load_dataset(name)
            except fedleak.FedleakError as exc:  # e.g. mni152 without fedleak[medical]
                print(f"skipping {name}: {exc}", file=sys.stderr)
    grid = [g for g in grid if g[0] in sets]
    started = time.time()

    def save(rows, extra):
        if args.out:
            write_atomic(args.out, dict(
                benchmark="fishing", seed=args.seed, quick=args.quick, cells=cells, workers=args.workers,
                started=started, seconds=time.time() - started,
                versions=dict(fedleak=fedleak.__version__, torch=torch.__version__, numpy=np.__version__,
                              python=platform.python_version()),
                machine=dict(cpus=os.cpu_count(), load=os.getloadavg(), platform=platform.platform()),
                options=dict(fishing=fedleak.FishingOptions().__dict__), rows=rows, **extra))

    rows = []
    for name, m, widths, floor in grid:
        row = run_cell(name, sets[name], m, widths, args.seed, min_psnr=floor, workers=args.workers)
        rows.append(row)
        print(f"{name} M={m} widths={widths} floor={floor}: fished rec. {row['fished_recovered']:.3f} "
              f"(false {row['false_certificates']}) PSNR {row['psnr_fished_mean']:.1f} fish {row['fish_s']:.2f}s "
              f"= {row['fish_s'] / row['gradient_s']:,.0f}x gradient, "
              f"{row['fish_s'] / max(row['lp_floor_s'], 1e-9):.1f}x "
              f"LP floor; {row['statuses']}", flush=True)
        save(rows, {})  # after every cell, so a long grid that is stopped keeps what it measured
    extra = {}
    if args.extra:
        fm = sets.get("fashion-mnist") or fedleak.load_dataset("fashion-mnist")
        extra["solvers"] = solver_comparison(fm, seed=args.seed)
        extra["formulation"] = formulation_comparison(fm, seed=args.seed)
        print(json.dumps(extra, indent=1), flush=True)
    save(rows, extra)
    print(table(rows))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
