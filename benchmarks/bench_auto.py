"""``attack="auto"`` against the exclusivity attack alone, on the cases auto has to route well.

    .venv/bin/python benchmarks/bench_auto.py                       # every case (~10 min on 1 core)
    .venv/bin/python benchmarks/bench_auto.py --cases flowernet --budget 20

Cases (recorded in the results file with versions, seeds and every setting):

* ``cnn-lfw``: fedleak's certifiable CNN, ``make_convnet((1, 25, 25), 2, channels=(6,), kernel=3, padding=1,
  fc_widths=(256,))``, FedSGD gradient of 4 LFW faces (batch seeds 0 and 1): ``exclusivity`` (its defaults,
  feature matching for what it cannot solve) against ``auto``;
* ``cnn-fashion``: the CNN of docs/cnn.md, ``make_convnet((1, 28, 28), 10, channels=(6, 32), kernel=3,
  padding=1, fc_widths=(1024,))`` (25.7M parameters), FedSGD gradient of 8 Fashion-MNIST images: the same two;
* ``fedavg-mlp``: ``make_mlp((1, 8, 8), [1024], 10)``, one full-batch SGD step at lr 0.1 on 8 digits (batch seeds
  0 and 1; neither the learning rate nor the steps revealed): ``auto``;
* ``fedavg-cnn``: the ``cnn-fashion`` model, one SGD step at lr 0.1 on 8 Fashion-MNIST images: ``auto``;
* ``fedavg-noise``: docs/weight-leakage.md's defense setting, ``make_mlp((1, 8, 8), [256], 10)``, one SGD step at
  lr 0.5 on 4 digits (batch seed 77), Gaussian noise of std sigma on the transmitted weights
  (``defend_update(..., make_defense("gaussian-noise", sigma=sigma), seed=0)``: noise on the weight change, no
  clipping): ``auto`` and ``dlm+`` alone, both with 300 iterations;
* ``flowernet``: Flower's quickstart CNN (``tests/user_models.py``, max pooled, no recorded input shape),
  FedSGD gradient of 2 retina patches (3 x 32 x 32): ``exclusivity`` and ``auto``.

``auto`` runs at ``--budget`` seconds (default: its own default budget), no progress bar. Every model is seeded
(0). PSNR is the standard definition (data range, per image, Hungarian-matched by ``fedleak.metrics.match``,
mean over the rebuilt samples); "recovered" = certified and exact. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fedleak
from fedleak.attacks.auto import DEFAULT_BUDGET
from fedleak.clients import fedavg_update
from fedleak.defenses import defend_update, make_defense
from fedleak.models.convnet import make_convnet
from fedleak.report.output import environment_info, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from user_models import FlowerNet  # noqa: E402

CNN_LFW = dict(channels=(6,), kernel=3, padding=1, fc_widths=(256,), seed=0)
CNN_FASHION = dict(channels=(6, 32), kernel=3, padding=1, fc_widths=(1024,), seed=0)
NOISE = (1e-6, 1e-5, 1e-4)


def score(rec: fedleak.Reconstruction, x: torch.Tensor, y: torch.Tensor) -> dict:
    m = fedleak.metrics.match(rec, x, y)
    matched = m.matched >= 0
    return {
        "rebuilt": len(rec),
        "certified": rec.num_certified,
        "recovered": int(m.recovered.sum()),
        "false_certificates": int(m.false_certificate.sum()),
        "psnr_mean": round(float(np.nanmean(m.psnr[matched])), 2) if matched.any() else None,
        "psnr_min": round(float(np.nanmin(m.psnr[matched])), 2) if matched.any() else None,
        "label_accuracy": round(m.label_accuracy, 3),
    }


def run(attack: str, model, update, x, y, budget: float, **options) -> dict:
    if attack == "auto":
        options = {"budget": budget, "progress": False, **options}
    start = time.perf_counter()
    rec = fedleak.reconstruct(model, update, attack=attack, **options)
    seconds = time.perf_counter() - start
    routes = {r: rec.routes.count(r) for r in dict.fromkeys(rec.routes)}
    return {"attack": attack, "produced_by": rec.attack, "seconds": round(seconds, 2), "iterations": rec.iterations,
            "routes": routes, **score(rec, x, y), "summary": rec.summary(),
            "why_uncertified": rec.why_uncertified()}


def cases(budget: float) -> dict:
    def cnn_lfw():
        data = fedleak.load_dataset("lfw")
        for seed in (0, 1):
            x, y = data.batch(4, seed=seed)
            model = make_convnet(data.input_shape, 2, **CNN_LFW)
            update = fedleak.compute_gradient_update(model, x, y)
            for attack in ("exclusivity", "auto"):
                yield {"batch_seed": seed, "batch": 4, **run(attack, model, update, x, y, budget)}

    def cnn_fashion():
        data = fedleak.load_dataset("fashion-mnist")
        x, y = data.batch(8, seed=0)
        model = make_convnet(data.input_shape, 10, **CNN_FASHION)
        update = fedleak.compute_gradient_update(model, x, y)
        for attack in ("exclusivity", "auto"):
            yield {"batch_seed": 0, "batch": 8, **run(attack, model, update, x, y, budget)}

    def fedavg_mlp():
        data = fedleak.load_dataset("digits")
        for seed in (0, 1):
            x, y = data.batch(8, seed=seed)
            model = fedleak.make_mlp(data.input_shape, [1024], 10, seed=0)
            update = fedavg_update(model, x, y, lr=0.1)
            yield {"batch_seed": seed, "batch": 8, "client_lr": 0.1, **run("auto", model, update, x, y, budget)}

    def fedavg_cnn():
        data = fedleak.load_dataset("fashion-mnist")
        x, y = data.batch(8, seed=0)
        model = make_convnet(data.input_shape, 10, **CNN_FASHION)
        update = fedavg_update(model, x, y, lr=0.1)
        yield {"batch_seed": 0, "batch": 8, "client_lr": 0.1, **run("auto", model, update, x, y, budget)}

    def fedavg_noise():
        data = fedleak.load_dataset("digits")
        x, y = data.batch(4, seed=77)
        model = fedleak.make_mlp(data.input_shape, [256], 10, seed=0)
        clean = fedavg_update(model, x, y, lr=0.5)
        for sigma in NOISE:
            noisy = defend_update(clean, make_defense("gaussian-noise", sigma=sigma), seed=0)
            for attack in ("dlm+", "auto"):
                yield {"batch_seed": 77, "batch": 4, "client_lr": 0.5, "sigma": sigma,
                       **run(attack, model, noisy, x, y, budget, iterations=300)}

    def flowernet():
        x, y = fedleak.load_dataset("retina").batch(2, seed=0)
        torch.manual_seed(0)
        model = FlowerNet()
        update = fedleak.compute_gradient_update(model, x, y)
        for attack in ("exclusivity", "auto"):
            yield {"batch_seed": 0, "batch": 2, **run(attack, model, update, x, y, budget)}

    return {"cnn-lfw": cnn_lfw, "cnn-fashion": cnn_fashion, "fedavg-mlp": fedavg_mlp, "fedavg-cnn": fedavg_cnn,
            "fedavg-noise": fedavg_noise, "flowernet": flowernet}


def table(rows: list[dict]) -> str:
    lines = ["| case | batch seed | attack | seconds | certified / batch | recovered | PSNR mean (min) | routes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "–" if r["psnr_mean"] is None else f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f})"
        routes = ", ".join(f"{n} {k}" for k, n in r["routes"].items())
        case = r["case"] + (f" σ={r['sigma']:g}" if "sigma" in r else "")
        lines.append(f"| {case} | {r['batch_seed']} | {r['attack']} | {r['seconds']:.1f} | "
                     f"{r['certified']}/{r['batch']} | {r['recovered']} | {psnr} | {routes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runners = cases(0.0)
    ap.add_argument("--cases", nargs="*", default=list(runners), choices=list(runners))
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="auto's budget in seconds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "auto.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runners = cases(args.budget)
    rows: list[dict] = []
    for name in args.cases:
        for row in runners[name]():
            rows.append({"case": name, **row})
            print({k: v for k, v in rows[-1].items() if k not in ("summary", "why_uncertified")}, flush=True)
            write_json(Path(args.out), dict(
                environment=environment_info(), torch_threads=torch.get_num_threads(), budget=args.budget,
                settings=dict(cnn_lfw=CNN_LFW, cnn_fashion=CNN_FASHION, fedavg_lr=0.1, noise_sigmas=NOISE,
                              model_seed=0),
                rows=rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
