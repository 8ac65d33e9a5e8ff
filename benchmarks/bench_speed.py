"""Speed of the exact attack against the cost of reading the gradient.

For MLPs of one, two and three hidden layers and a CNN on Fashion-MNIST, at several batch sizes M, and for a
user's own ``nn.Module`` (``x.view``, ``F.relu``, Dropout) on the other built-in data (two-class LFW, MNI152
slices, retina; some batches normalised to zero mean and unit variance), its clients sending gradients or
FedAvg weight updates, in one process per model (torch pinned to one thread; the models: ``speed_cells.py``):

- **gradient**: the client's gradient as a client computes it, with plain torch autograd
  (``torch.autograd.grad`` of the mean cross-entropy over the batch); the reference of every ratio. For a FedAvg
  client, its local training instead: that many plain-autograd SGD steps on a copy of the weights;
- **f64 copy**: one float64 copy of what the client sends (the least any float64 attack must do);
- **attack**: ``fedleak.reconstruct(model, update)`` with its defaults (it peels the update round after round where
  its batch size is reported: each round one more reading of what the certified samples leave);
- **one reading**: the same with ``peel=False``, which reads the update once;
- for the CNN also **fishing** (``fedleak.fish(model, x, y, solve_check=False)``, as docs/cnn.md runs it) and
  the attack on the fished batch.

Times are medians of ``--repeats`` interleaved repeats (gradient, copy, attack, ... in turn) after one warm-up.
With ``--rounds N`` each model's timing process runs ``N`` times (with ``--before``, alternating with the previous
version's): a cell's times are the medians over the rounds, and its ratios the medians of each round's ratios
(a ratio is taken within one process; on a virtual machine whose speed drifts between processes the rounds
keep one slow process from deciding a cell).
Memory: the process's peak RSS during the cell, and the attack's (for the CNN also fishing's and the fished
attack's) peak extra memory over the RSS just before it
(the kernel's peak-RSS mark is reset before the attack; glibc's malloc returns large blocks to the system, see
``MALLOC_MMAP_THRESHOLD_`` below), against the gradient's size. Every cell also records the recovered fraction
and the false certificates (``fedleak.metrics.match`` on the data's range), so that a faster attack is seen
to give the same results.

    .venv/bin/python benchmarks/bench_speed.py                  # full table (about 5 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_speed.py --quick          # widths 256/1024, M 1 and 64, no CNN (~1 min)
    .venv/bin/python benchmarks/bench_speed.py --before /tmp/previous/src    # and the previous version, in turn
    .venv/bin/python benchmarks/bench_speed.py --rounds 3 --before /tmp/previous/src   # as docs/benchmarks.md
    .venv/bin/python benchmarks/bench_speed.py --doc-only     # the docs table again, from speed.json

Results go to ``benchmarks/results/speed.json`` (versions, seed, settings, machine, load average) and the
markdown table to ``docs/benchmarks.md`` between the ``speed`` markers; where
``benchmarks/results/speed_before.json`` exists (the same script run on the previous version of the attack: with
``--before``, model by model in turn with this version, so that the machine's drift touches both alike), the
table puts its attack times and ratios next to the new ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from speed_cells import DATASET, FULL, QUICK, Cell, ModelSpec
from speed_table import table, write_doc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
BEFORE = ROOT / "benchmarks" / "results" / "speed_before.json"
# a fixed mmap threshold (which also turns off glibc's dynamic one) hands every block of 128 KiB or more back to
# the system when freed, so that the RSS measures what the attack holds, not what malloc kept from earlier work
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# -------------------------------------------------------------------------------------------------------
# Memory, read from the kernel


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_extra_mb(fn) -> tuple[float, object]:
    """Run ``fn`` once; returns its peak RSS over the RSS just before it (MB) and its result."""
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - base) / 1024, out


# -------------------------------------------------------------------------------------------------------
# One model, in its own process


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call (CPU time: the process's, which other jobs disturb less)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def time_model(spec: ModelSpec, repeats: int, seed: int) -> list[dict]:
    """Every cell of one model: times (medians of interleaved repeats, ms) and results."""
    import torch

    import fedleak
    from fedleak import metrics

    torch.set_num_threads(1)
    data = fedleak.load_dataset(spec.dataset)
    rows = []
    for m in spec.batches:
        cell = Cell(spec, m, data, seed)
        steps = cell.steps()
        for fn in steps.values():  # warm-up (lazy imports, caches)
            fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):  # interleaved: the machine's load touches every step alike
            for k, fn in steps.items():
                wall, used = _timed(fn)
                times[k].append(wall)
                cpu[k].append(used)
        rec, once = cell.attack(), cell.one_reading()
        scores = metrics.match(rec, cell.x, cell.y, data_range=cell.value_range)
        once_scores = metrics.match(once, cell.x, cell.y, data_range=cell.value_range)
        row = {
            "model": spec.name, "widths": list(spec.widths), "conv": list(spec.conv), "batch_size": m,
            "dataset": spec.dataset, "user": spec.user, "normalise": spec.normalise, "rebuilt": len(rec.samples),
            "parameters": sum(p.numel() for p in cell.params),
            "local_steps": spec.local_steps,
            "gradient_mb": sum(g.numel() * g.element_size() for g in cell.sent.values()) / 2**20,
            **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()},
            **{f"{k}_all_ms": [1000 * s for s in v] for k, v in times.items()},
            **{f"{k}_cpu_ms": 1000 * statistics.median(v) for k, v in cpu.items()},
            "certified": rec.num_certified, "recovered": int(scores.recovered.sum()),
            "recovered_fraction": float(scores.recovered.mean()),
            "false_certificates": int(scores.false_certificates),
            "one_reading_recovered": int(once_scores.recovered.sum()),
            "one_reading_false_certificates": int(once_scores.false_certificates),
        }
        if spec.conv:
            fished_rec = cell.fished_attack()
            fs = metrics.match(fished_rec, cell.fished.inputs, cell.y, data_range=cell.value_range)
            row.update(fished_certified=fished_rec.num_certified, fished_recovered=int(fs.recovered.sum()),
                       fished_recovered_fraction=float(fs.recovered.mean()),
                       fished_false_certificates=int(fs.false_certificates))
        rows.append(row)
    return rows


def memory_model(spec: ModelSpec, seed: int) -> list[dict]:
    """Every cell of one model: the attack's peak extra memory over the RSS before it, and the cell's peak RSS
    (run under ``MALLOC_ENV``, in a process of its own: the timings are taken without it)."""
    import torch

    import fedleak

    torch.set_num_threads(1)
    data = fedleak.load_dataset(spec.dataset)
    rows = []
    for m in spec.batches:
        gc.collect()
        _reset_peak()
        cell = Cell(spec, m, data, seed)
        row = {"batch_size": m}
        for step in ("attack", "fish", "fished_attack") if spec.conv else ("attack",):
            fn = getattr(cell, step)
            fn()  # warm-up: lazy imports are not the step's memory
            row[f"{step}_peak_extra_mb"], _ = _peak_extra_mb(fn)
        rows.append({**row, "cell_peak_rss_mb": _status_kib("VmHWM") / 1024,
                     "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        del cell
    return rows


# -------------------------------------------------------------------------------------------------------
# The table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small grid (widths 256/1024 and 1024-1024, M 1 and 64)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per cell (medians); default 5")
    ap.add_argument("--rounds", type=int, default=1,
                    help="timing processes per model (alternating with --before's); medians over them; default 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="", help="comma-separated model names to run (default: all of the grid)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the docs table from the results file, run nothing")
    ap.add_argument("--before", type=Path, metavar="SRC",
                    help="also time the previous version whose package source is SRC (e.g. a git worktree's src), "
                         "model by model in turn with this one, into speed_before.json, or beside --out's file with "
                         "_before added to its name (machine drift touches both)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = ap.parse_args()
    grid = QUICK if args.quick else FULL
    if args.models:
        wanted = args.models.split(",")
        grid = tuple(s for s in grid if s.name in wanted)
    if args.worker:
        spec = next(s for s in grid if s.name == args.worker)
        rows = time_model(spec, args.repeats, args.seed) if args.part == "time" else memory_model(spec, args.seed)
        print(json.dumps(rows))
        return
    before_file = BEFORE if args.out == RESULTS else args.out.with_name(args.out.stem + "_before.json")
    before = json.loads(before_file.read_text())["rows"] if before_file.exists() and args.out != before_file else []
    if args.doc_only:
        saved = json.loads(args.out.read_text())
        write_doc(saved["rows"], before, saved["meta"])
        print(table(saved["rows"], before))
        return
    import torch

    from fedleak.nets.blas import cpu_model, torch_blas_preferred
    from fedleak.report.output import environment_info, write_json

    command = "python benchmarks/bench_speed.py" + " ".join(
        [""] + (["--quick"] if args.quick else []) + ([f"--repeats {args.repeats}"] if args.repeats != 5 else [])
        + ([f"--rounds {args.rounds}"] if args.rounds != 1 else [])
        + ([f"--models {args.models}"] if args.models else [])
        + (["--before <previous version's src>"] if args.before else []))
    meta = {
        "date": time.strftime("%Y-%m-%d"), "command": command, "data": f"{DATASET} unless a row names its dataset",
        "seed": args.seed,
        "repeats": args.repeats, "rounds": args.rounds, "torch": torch.__version__, "torch_threads": 1,
        "models": [asdict(s) for s in grid],
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "processor": cpu_model(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "float64_products": "torch's BLAS" if torch_blas_preferred() else "numpy's BLAS",
                    "load_average_start": os.getloadavg()},
        "malloc_env": MALLOC_ENV, "environment": environment_info(),
        "fishing": "fedleak.fish(model, x, y, solve_check=False)",
        "reference": "torch.autograd.grad of the mean cross-entropy over the batch (plain autograd, one thread)",
    }
    if args.before:
        meta["before_source"] = str(args.before)
    started = time.perf_counter()
    rows: list[dict] = []
    previous: list[dict] = []
    versions = [(previous, before_file, {"PYTHONPATH": str(args.before.resolve())})] if args.before else []
    for spec in grid:
        memory = {path: run_part(spec, args, "memory", env) for _, path, env in versions + [(rows, args.out, {})]}
        timed: dict[Path, list[list[dict]]] = {path: [] for path in memory}
        for _ in range(args.rounds):  # alternating: the machine's drift touches every version alike
            for _, path, env in versions + [(rows, args.out, {})]:
                timed[path].append(run_part(spec, args, "time", env))
        for out_rows, path, env in versions + [(rows, args.out, {})]:
            out_rows.extend({**t, **m} for t, m in zip(merge_rounds(timed[path]), memory[path]))
            # written after every model (``complete`` False until the last): a long run keeps what it measured
            meta.update(seconds=time.perf_counter() - started, complete=spec is grid[-1])
            meta["machine"]["load_average_end"] = os.getloadavg()
            write_json(path, {"meta": meta, "rows": out_rows})
        print(f"{spec.name}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.before:
        before = previous
    if not args.no_doc:
        write_doc(rows, before, meta)
    print(table(rows, before))


def run_part(spec: ModelSpec, args: argparse.Namespace, part: str, env: dict[str, str]) -> list[dict]:
    """One model's cells, ``part`` "time" or "memory" (the latter under ``MALLOC_ENV``), in a fresh process with
    ``env`` added."""
    cmd = [sys.executable, __file__, "--worker", spec.name, "--part", part, "--repeats", str(args.repeats),
           "--seed", str(args.seed)] + (["--quick"] if args.quick else []) + (
              ["--models", args.models] if args.models else [])
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, **(MALLOC_ENV if part == "memory" else {}), **env})
    if out.returncode:
        sys.exit(f"{spec.name} ({part}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Each cell over the rounds: its times are the medians over them (every repeat kept in ``*_all_ms``), and
    ``ratios`` holds, for each step, the median of the rounds' step / gradient ratios (wall clock and CPU)."""
    merged = []
    for cells in zip(*rounds):
        row = dict(cells[0])
        for key in cells[0]:
            if key.endswith("_all_ms"):
                row[key] = [v for c in cells for v in c[key]]
            elif key.endswith("_ms"):
                row[key] = statistics.median(c[key] for c in cells)
        steps = [k[: -len("_all_ms")] for k in cells[0] if k.endswith("_all_ms")]
        row["ratios"] = {step: {"wall": statistics.median(c[f"{step}_ms"] / c["gradient_ms"] for c in cells),
                                "cpu": statistics.median(c[f"{step}_cpu_ms"] / c["gradient_cpu_ms"] for c in cells)}
                         for step in steps}
        row["rounds"] = len(cells)
        merged.append(row)
    return merged


if __name__ == "__main__":
    main()
