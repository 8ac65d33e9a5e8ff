"""What a benchmark's results file records of the run that wrote it (the date, fedleak's version and path, the
machine, torch and the other packages' versions, torch's thread count, the benchmark's own settings and the command),
and the file itself, written atomically."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import fedleak
from fedleak.federation.run import package_versions
from fedleak.nets.blas import cpu_model
from fedleak.report.output import write_atomic


def machine() -> str:
    """This machine in words, e.g. ``2 cores of an Intel(R) Xeon(R) Processor, x86_64``."""
    return f"{os.cpu_count()} cores of an {cpu_model()}, {platform.machine()}"


def run_meta(command: str, **settings: object) -> dict[str, object]:
    """The results file's ``meta`` for a run of ``command`` with ``settings`` (torch pinned to one thread, as every
    benchmark runs it)."""
    return {"date": time.strftime("%Y-%m-%d"), "fedleak": fedleak.__version__, "fedleak_path": fedleak.__file__,
            "machine": machine(), "torch": torch.__version__, "versions": package_versions(), "torch_threads": 1,
            **settings, "command": command}


def write_results(path: Path, **content: object) -> None:
    """``content`` (its ``meta`` first) as ``path``'s JSON, written atomically, the folder made where missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(content, indent=1))


def seeded_arguments(doc: str, results: Path) -> argparse.Namespace:
    """The command line of a benchmark that takes a ``--seed`` and an ``--out`` file (default ``results``), its help
    ``doc``; torch pinned to one thread, as every benchmark runs it."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=results)
    args = ap.parse_args()
    torch.set_num_threads(1)
    return args
