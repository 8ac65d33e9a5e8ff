"""What the certificate hunts of a model and its twin share: their options (a seed, gradients or one-step weight
changes, where the results go) and their batches, a data set's batch as drawn or a sample and its copies moved by
noise of 1e-3 (one label), the hardest case for a certificate (a blend of near-copies reads as one sample)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fedleak


def hunt_batch(data: fedleak.Dataset, size: int, seed: int, copies: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``data`` (``seed``), or, with ``copies``, its first and ``size - 1`` noisy copies of it."""
    x, y = data.batch(size, seed=seed)
    if copies and size > 1:
        noise = 1e-3 * torch.randn(size - 1, *x.shape[1:], generator=torch.Generator().manual_seed(seed))
        lo, hi = data.value_range
        x = torch.cat([x[:1], (x[:1] + noise).clamp(lo, hi)])
        y = y[:1].repeat(size)
    return x, y


def hunt_options(doc: str, name: str) -> tuple[int, bool, Path]:
    """The hunt's seed, whether it attacks weight changes (``--update weights``) rather than gradients, and its results
    file (``--out``, else ``results/<name>.json`` or ``results/<name>_weights.json``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update", choices=("gradient", "weights"), default="gradient")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    weights = args.update == "weights"
    results = Path(__file__).resolve().parent / "results"
    return args.seed, weights, args.out or results / f"{name}{'_weights' if weights else ''}.json"
