"""Weight-update leakage benchmark: DLM / DLM+ against local steps and batch size, and every attack
against the DLM paper's two defenses.

    .venv/bin/python benchmarks/bench_weight_leakage.py                 # all three tables (~15 min, 1 core)
    .venv/bin/python benchmarks/bench_weight_leakage.py --only defenses --iterations 200

Settings (recorded in the results file with versions and seeds):

* clients: full-batch SGD for E local steps at learning rate ``--client-lr`` (the attacker does not know
  it); the number of steps is revealed to the attacker in the steps/batch tables (threat model "known
  schedule"), and the one-step defense table reveals nothing but ``num_examples``;
* models: ``mlp`` = Flatten-Linear(d,64)-ReLU-Linear(64,10); ``lenet`` = fedleak.make_lenet, sigmoid;
  the defense table uses a wider MLP (256 hidden) so that the exact exclusivity route applies;
* attacks: default settings of fedleak's DLM/DLM+ (Adam 0.1, step decay, box [0,1]) with
  ``--iterations`` iterations, one restart, seed 0, plus ``--attack-options`` (JSON, e.g. ``'{"signed": true}'``,
  recorded per row) in the steps/batch table; PSNR is the standard definition (data range 1,
  per image, Hungarian-matched, mean over the batch); "recovered" = certified and exact (max error < 1e-4).

Torch runs on one thread (``torch.set_num_threads(1)``): these attacks are many tiny second-order ops,
and a second thread only adds contention on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fedleak
from fedleak.attacks.auto import exclusivity_on_weights
from fedleak.clients import fedavg_update
from fedleak.defenses import defend_update, make_defense

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "weight_leakage.json"

DATA = {"digits": "digits", "fashion": "fashion-mnist"}


def build(arch: str, shape, width: int = 64):
    if arch == "mlp":
        return fedleak.make_mlp(shape, [width], 10, seed=0)
    return fedleak.make_lenet(shape, 10, activation="sigmoid", seed=0)


def score(rec, x, y) -> dict:
    m = fedleak.metrics.match(rec, x, y)
    return {
        "psnr_mean": round(float(np.nanmean(np.where(m.matched >= 0, m.psnr, np.nan))) if (m.matched >= 0).any()
                           else float("nan"), 2),
        "psnr_min": round(float(np.nanmin(m.psnr)) if (m.matched >= 0).any() else float("nan"), 2),
        "ssim_mean": round(float(np.nanmean(m.ssim)) if (m.matched >= 0).any() else float("nan"), 3),
        "recovered": round(m.recovered_fraction, 3),
        "label_accuracy": round(m.label_accuracy, 3),
        "false_certificates": int(m.false_certificate.sum()),
    }


def run(attack: str, model, update, x, y, iterations: int, options: dict | None = None) -> dict:
    start = time.perf_counter()
    if attack == "exclusivity":
        rec = exclusivity_on_weights(model, update)
    elif attack == "auto":
        rec = fedleak.reconstruct(model, update, attack="auto", iterations=iterations, budget=None, progress=False)
    else:
        rec = fedleak.reconstruct(model, update, attack=attack, iterations=iterations, **(options or {}))
    seconds = time.perf_counter() - start
    out = {"attack": attack, "seconds": round(seconds, 2), "iterations": rec.iterations, "produced_by": rec.attack}
    if len(rec) == 0:
        out.update(psnr_mean=float("nan"), psnr_min=float("nan"), ssim_mean=float("nan"), recovered=0.0,
                   label_accuracy=0.0, false_certificates=0)
    else:
        out.update(score(rec, x, y))
    return out


def steps_and_batch(datasets, archs, steps_grid, batch_grid, fixed_m, fixed_e, iterations, client_lr, log,
                    options: dict | None = None):
    rows = []
    for dname in datasets:
        ds = fedleak.load_dataset(DATA[dname])
        for arch in archs:
            model = build(arch, ds.input_shape)
            configs = [(fixed_m, e) for e in steps_grid] + [(m, fixed_e) for m in batch_grid if m != fixed_m]
            for m, e in configs:
                x, y = ds.batch(m, seed=1000 + m)
                upd = fedavg_update(model, x, y, lr=client_lr, local_steps=e, reveal_local_steps=True)
                for attack in ("dlm", "dlm+"):
                    r = run(attack, model, upd, x, y, iterations, options)
                    r.update(dataset=dname, model=arch, batch=m, local_steps=e, options=options or {})
                    rows.append(r)
                    log(f"{dname:8s} {arch:6s} M={m} E={e:2d} {attack:5s} psnr={r['psnr_mean']:6.2f} "
                        f"({r['seconds']:.1f} s)")
    return rows


def defenses(iterations, client_lr, noise_grid, sparsity_grid, m, log):
    ds = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(ds.input_shape, [256], 10, seed=0)
    x, y = ds.batch(m, seed=77)
    clean = fedavg_update(model, x, y, lr=client_lr, local_steps=1)  # one step; lr and steps not revealed
    rows = []
    # noise: std s on every entry of the weight change (no clipping); sparsity: the fraction p of smallest entries
    # of every tensor of the change dropped (DLG's gradient pruning)
    cases = [("noise", s, defend_update(clean, make_defense("gaussian-noise", sigma=s), seed=0) if s > 0 else clean)
             for s in noise_grid]
    cases += [("sparsity", p, defend_update(clean, make_defense("gradient-pruning", ratio=p), seed=0))
              for p in sparsity_grid if p > 0]
    for defense, strength, upd in cases:
        for attack in ("exclusivity", "auto", "dlm", "dlm+", "dlg", "idlg", "ig"):
            r = run(attack, model, upd, x, y, iterations)
            r.update(defense=defense, strength=strength)
            rows.append(r)
            log(f"{defense:8s} {strength:<8g} {attack:11s} psnr={r['psnr_mean']:6.2f} rec={r['recovered']:.2f} "
                f"({r['seconds']:.1f} s, {r['produced_by']})")
    return rows


def markdown(result: dict) -> str:
    """The tables of docs/weight-leakage.md, from a results file."""
    out: list[str] = []
    rows = result.get("steps_and_batch", [])
    groups = sorted({(r["dataset"], r["model"]) for r in rows})
    fixed_m, fixed_e = result["settings"]["fixed_batch"], result["settings"]["fixed_steps"]
    for title, key, fixed_key, fixed in (("local steps E", "local_steps", "batch", fixed_m),
                                         ("batch size M", "batch", "local_steps", fixed_e)):
        sel = [r for r in rows if r[fixed_key] == fixed]
        values = sorted({r[key] for r in sel})
        if not values:
            continue
        other = "M" if fixed_key == "batch" else "E"
        out.append(f"PSNR (dB, mean over the batch) against the {title} ({other} = {fixed}); DLM / DLM+; seconds in brackets\n")
        out.append("| data | model | " + " | ".join(f"{'E' if key == 'local_steps' else 'M'}={v}" for v in values) + " |")
        out.append("|---|---|" + "---|" * len(values))
        for d, mdl in groups:
            cells = []
            for v in values:
                got = {r["attack"]: r for r in sel if r["dataset"] == d and r["model"] == mdl and r[key] == v}
                if not got:
                    cells.append("–")
                    continue
                a, b = got.get("dlm"), got.get("dlm+")
                cells.append(" / ".join(f"{x['psnr_mean']:.1f}" if x else "–" for x in (a, b))
                             + f" ({sum(x['seconds'] for x in (a, b) if x):.0f} s)")
            out.append(f"| {d} | {mdl} | " + " | ".join(cells) + " |")
        out.append("")
    erows = result.get("exact_route", [])
    if erows:
        lrs = sorted({r["client_lr"] for r in erows})
        out.append("Recovered fraction (certified and exact) of the exact route on a one-step weight delta\n")
        out.append("| batch M | " + " | ".join(f"client lr {v:g}" for v in lrs) + " |")
        out.append("|---|" + "---|" * len(lrs))
        for m in sorted({r["batch"] for r in erows}):
            cells = [next(f"{r['recovered']:.2f} ({r['seconds']:.2f} s)" for r in erows
                          if r["batch"] == m and r["client_lr"] == v) for v in lrs]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    drows = result.get("defenses", [])
    if drows:
        attacks = list(dict.fromkeys(r["attack"] for r in drows))
        for defense in ("noise", "sparsity"):
            sel = [r for r in drows if r["defense"] == defense or (r["defense"] == "noise" and r["strength"] == 0)]
            strengths = sorted({r["strength"] for r in sel})
            label = "noise sigma" if defense == "noise" else "sparsity"
            out.append(f"PSNR (dB) / recovered fraction against the {label}\n")
            out.append(f"| {label} | " + " | ".join(attacks) + " |")
            out.append("|---|" + "---|" * len(attacks))
            for s_ in strengths:
                cells = []
                for a in attacks:
                    r = next((r for r in sel if r["strength"] == s_ and r["attack"] == a), None)
                    psnr = "n/a" if r is None or r["psnr_mean"] != r["psnr_mean"] else f"{r['psnr_mean']:.1f}"
                    cells.append("–" if r is None else f"{psnr} / {r['recovered']:.2f}")
                out.append(f"| {s_:g} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def exact_route(widths, batches, lrs, log):
    """The exact route alone (exclusivity on a one-step weight delta of unknown learning rate)."""
    ds = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(ds.input_shape, widths, 10, seed=0)
    rows = []
    for m in batches:
        x, y = ds.batch(m, seed=900 + m)
        for lr in lrs:
            upd = fedavg_update(model, x, y, lr=lr, local_steps=1)
            r = run("exclusivity", model, upd, x, y, 0)
            r.update(batch=m, client_lr=lr, widths=list(widths))
            rows.append(r)
            log(f"exact M={m:3d} lr={lr:<6g} recovered={r['recovered']:.2f} false={r['false_certificates']} "
                f"({r['seconds']:.2f} s)")
    return rows


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["steps", "defenses", "exact"], default=None)
    ap.add_argument("--exact-widths", nargs="+", type=int, default=[1024])
    ap.add_argument("--exact-batches", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--exact-lrs", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--client-lr", type=float, default=0.05)
    ap.add_argument("--datasets", nargs="+", default=["digits", "fashion"], choices=sorted(DATA))
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5, 10])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--fixed-batch", type=int, default=4)
    ap.add_argument("--fixed-steps", type=int, default=5)
    ap.add_argument("--defense-lr", type=float, default=0.5)
    ap.add_argument("--noise", nargs="+", type=float, default=[0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.25, 0.5, 0.75, 0.9, 0.99])
    ap.add_argument("--defense-batch", type=int, default=4)
    ap.add_argument("--attack-options", type=json.loads, default={},
                    help='extra DLM/DLM+ options for the steps table, as JSON, e.g. \'{"restarts": 2}\'')
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tables", type=Path, default=None, help="print the markdown tables of a results file and exit")
    args = ap.parse_args(argv)
    if args.tables is not None:
        print(markdown(json.loads(args.tables.read_text())))
        return 0
    torch.set_num_threads(1)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-time optimizer imports (~3 s), untimed
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    result: dict = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"fedleak": fedleak.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "machine": platform.machine(), "threads": 1},
        "seeds": {"models": 0, "attacks": 0, "batches": "1000+M (steps/batch), 77 (defenses)"},
    }
    if args.only in (None, "steps"):
        result["steps_and_batch"] = steps_and_batch(args.datasets, args.models, args.steps, args.batches,
                                                    args.fixed_batch, args.fixed_steps, args.iterations,
                                                    args.client_lr, log, args.attack_options)
    if args.only in (None, "defenses"):
        result["defenses"] = defenses(args.iterations, args.defense_lr, args.noise, args.sparsity,
                                      args.defense_batch, log)
    if args.only in (None, "exact"):
        result["exact_route"] = exact_route(args.exact_widths, args.exact_batches, args.exact_lrs, log)
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write(args.out, json.dumps(result, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
