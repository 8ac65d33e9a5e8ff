"""What the benchmarks that compare a user's model with its hand-made twin share: the two attacks timed in turn,
the totals of their rows, and the printed report."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed_in_turn(runs: dict[str, Callable[[], object]], repeats: int = 17, warm: int = 2) -> dict[str, float]:
    """Each of ``runs`` timed ``repeats`` times, in turn with the others: ``{"<name>_ms": median}`` over the repeats
    after the first ``warm``."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {f"{name}_ms": 1000 * statistics.median(values[warm:]) for name, values in times.items()}


def twin_totals(rows: list[dict]) -> dict[str, object]:
    """The cells, certified samples of the model and of its twin, false certificates, cells where they certify other
    samples, and the largest difference of their certified inputs, over ``rows``."""
    return {"cells": len(rows), "certified": sum(r["certified"] for r in rows),
            "twin_certified": sum(r["twin_certified"] for r in rows), "false": sum(r["false"] for r in rows),
            "cells_differing": sum(not r["same_samples"] for r in rows),
            "max_input_difference": max((r["max_input_difference"] or 0.0) for r in rows)}


def print_report(totals: dict, timing: list[dict], fishing: list[dict], changed: str) -> None:
    """``totals``, the timing table (the model, ``changed`` as it is, against its twin) and the fishing rows."""
    print(totals)
    print(f"| model | attack ms, {changed} | attack ms, twin |")
    for t in timing:
        print(f"| {t['model']} | {t['model_ms']:.1f} | {t['twin_ms']:.1f} |")
    for f in fishing:
        print(f)
