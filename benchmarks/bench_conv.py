"""Benchmark of the CNN exclusivity attack: certified / recovered fraction vs batch size, time, PSNR.

    .venv/bin/python benchmarks/bench_conv.py [--quick]

Settings are recorded in the results file (benchmarks/results/conv.json, written atomically).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

import fedleak
from fedleak.attacks.conv_exclusivity import conv_exclusivity_attack
from fedleak.models.convnet import make_convnet
from fedleak.updates import compute_gradient_update

CASES = [  # dataset, classes, channels, fc width
    ("lfw", 2, (6, 32), 256),
    ("fashion-mnist", 10, (6, 32), 256),
    ("retina", 2, (6, 32), 256),
]


def run(dataset, classes, channels, fc, M, seed, fallback_steps):
    ds = fedleak.load_dataset(dataset)
    x, y = ds.batch(M, seed=seed)
    model = make_convnet(tuple(x.shape[1:]), classes, channels=channels, fc_widths=(fc,), seed=seed)
    upd = compute_gradient_update(model, x, y)
    t = time.perf_counter()
    rec = conv_exclusivity_attack(model, upd, fallback_steps=fallback_steps)
    secs = time.perf_counter() - t
    flat = x.reshape(M, -1).double()
    errs, psnrs, exact, false_cert = [], [], 0, 0
    used = set()
    for k, r in enumerate(rec.inputs.reshape(len(rec), flat.shape[1]).double()):
        d = (flat - r).abs().max(1).values
        j = int(d.argmin())
        err = float(d[j])
        mse = float(((flat[j] - r) ** 2).mean())
        psnrs.append(10 * np.log10(1.0 / max(mse, 1e-20)))
        if err < 1e-4 and j not in used:
            exact += 1
            used.add(j)
        if bool(rec.certified[k]):
            errs.append(err)
            false_cert += err >= 1e-4
    return dict(dataset=dataset, batch=M, seed=seed, channels=list(channels), fc=fc, rebuilt=len(rec),
                certified=rec.num_certified, exact=exact, certified_fraction=rec.num_certified / M,
                recovered_fraction=exact / M, false_certificates=int(false_cert),
                max_certified_error=max(errs) if errs else None, mean_psnr=float(np.mean(psnrs)) if psnrs else None,
                seconds=secs, batch_certified=rec.batch_certified)


def main() -> None:
    quick = "--quick" in sys.argv
    torch.set_num_threads(1)
    sizes = [4, 8] if quick else [4, 8, 16, 32]
    rows = []
    for dataset, classes, channels, fc in CASES:
        for M in sizes:
            if dataset == "retina" and M > 8:
                continue
            r = run(dataset, classes, channels, fc, M, seed=0, fallback_steps=100)
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = dict(settings=dict(sizes=sizes, fallback_steps=100, threads=1, model="make_convnet(kernel=3, padding=0, pool=None)",
                             torch=torch.__version__, python=platform.python_version(), fishing=False), rows=rows)
    path = os.path.join(os.path.dirname(__file__), "results", "conv.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, path)
    print("| data | M | certified | exact (any) | false cert. | max err (cert.) | PSNR | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        me = "-" if r["max_certified_error"] is None else f"{r['max_certified_error']:.1e}"
        ps = "-" if r["mean_psnr"] is None else f"{r['mean_psnr']:.0f}"
        print(f"| {r['dataset']} | {r['batch']} | {r['certified']}/{r['batch']} | {r['exact']}/{r['batch']} | "
              f"{r['false_certificates']} | {me} | {ps} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
