"""Benchmark of the CNN exclusivity attack, natural and fished: recovered fraction vs batch size, attack and
fishing time, PSNR, on Fashion-MNIST, the LFW faces and medical images (MNI152 brain MRI slices, retina
fundus patches).

    .venv/bin/python benchmarks/bench_conv.py                 # full grid, ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_conv.py --quick         # batches 8 and 32 on LFW only
    .venv/bin/python benchmarks/bench_conv.py --out FILE      # default benchmarks/results/conv.json

Every cell: one batch drawn with the seed, a model ``make_convnet(CASE, seed)``; the natural batch is
attacked with ``fedleak.reconstruct`` (defaults), then the batch is fished (``fedleak.fish``,
``solve_check=False``) and attacked again. "recovered" is ``metrics.match(...).recovered`` against the
batch the client actually sent (certified, label right, max abs error < 1e-4); a certified sample that is not
exact is a false certificate. Results (versions, seed, settings per row) are written atomically; the markdown
table printed at the end is the one in docs/cnn.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fedleak
from fedleak.models.convnet import make_convnet
from fedleak.report.output import environment_info, write_json

# data set -> make_convnet keywords (kernel 3, no pooling; the head is 1024 wide)
CASES = {
    "fashion-mnist": dict(channels=(6, 32), padding=1, fc_widths=(1024,)),
    "lfw": dict(channels=(6, 32), padding=1, fc_widths=(1024,)),
    "mni152": dict(channels=(6, 32), padding=1, fc_widths=(1024,)),
    "retina": dict(channels=(12, 32), padding=1, fc_widths=(1024,)),
}
SIZES = (4, 8, 16, 32, 64)


def attack(model, inputs, labels, originals):
    t0 = time.perf_counter()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, inputs, labels))
    secs = time.perf_counter() - t0
    sent = fedleak.metrics.match(rec, inputs, labels)
    orig = fedleak.metrics.match(rec, originals, labels)
    return rec, sent, orig, secs


def cell(dataset: str, batch: int, seed: int) -> dict:
    data = fedleak.load_dataset(dataset)
    kwargs = CASES[dataset]
    x, y = data.batch(batch, seed=seed)
    model = make_convnet(data.input_shape, data.num_classes, kernel=3, pool=None, seed=seed, **kwargs)
    rec, nat, _, nat_s = attack(model, x, y, x)
    t0 = time.perf_counter()
    fished = fedleak.fish(model, x, y, solve_check=False)
    fish_s = time.perf_counter() - t0
    frec, fis, fis_orig, fis_s = attack(model, fished.inputs, y, x)
    cert_err = fis.max_abs_error[fis.certified & (fis.matched >= 0)]
    return dict(
        dataset=dataset, batch=batch, seed=seed, model=dict(kernel=3, pool=None, **kwargs),
        natural_certified=rec.num_certified, natural_recovered=int(nat.recovered.sum()),
        natural_false_certificates=int(nat.false_certificate.sum()), natural_attack_s=nat_s,
        fished_samples=int(sum(s.status == "fished" for s in fished.samples)),
        fished_certified=frec.num_certified, fished_recovered=int(fis.recovered.sum()),
        fished_false_certificates=int(fis.false_certificate.sum()), fished_attack_s=fis_s, fish_s=fish_s,
        max_certified_error=float(cert_err.max()) if len(cert_err) else None,
        linf_mean=float(fished.linf.mean()), linf_max=float(fished.linf.max()),
        psnr_fished_vs_original=float(np.mean(fished.psnr)),
        psnr_rebuilt_vs_original=float(fis_orig.mean_psnr()),
        batch_certified=bool(frec.batch_certified),
    )


def table(rows: list[dict]) -> str:
    lines = ["| data | M | natural | fished | false cert. | max err (cert.) | L∞ mean | PSNR fished vs orig. "
             "| attack s (natural / fished) | fish s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        me = "-" if r["max_certified_error"] is None else f"{r['max_certified_error']:.1e}"
        false = r["natural_false_certificates"] + r["fished_false_certificates"]
        lines.append(
            f"| {r['dataset']} | {r['batch']} | {r['natural_recovered']}/{r['batch']} | "
            f"**{r['fished_recovered']}/{r['batch']}** | {false} | {me} | {r['linf_mean']:.3f} | "
            f"{r['psnr_fished_vs_original']:.1f} dB | {r['natural_attack_s']:.1f} / {r['fished_attack_s']:.1f} | "
            f"{r['fish_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", nargs="*", default=list(CASES))
    ap.add_argument("--sizes", nargs="*", type=int, default=list(SIZES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "conv.json"))
    args = ap.parse_args(argv)
    data, sizes = (["lfw"], [8, 32]) if args.quick else (args.data, args.sizes)
    rows = []
    for dataset in data:
        for M in sizes:
            rows.append(cell(dataset, M, args.seed))
            print(rows[-1], flush=True)
            write_json(Path(args.out), dict(
                environment=environment_info(), seed=args.seed, torch_threads=torch.get_num_threads(),
                settings=dict(cases={k: CASES[k] for k in data}, sizes=sizes, fish=dict(solve_check=False),
                              attack="fedleak.reconstruct defaults"), rows=rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
