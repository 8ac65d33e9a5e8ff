"""``report.html`` and ``results.json`` of a federation run.

The page (a verdict, rounds and clients as tables, one panel per client, images with reasons) is rendered by
:mod:`fedleak.report.federation`; it is self-contained and offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fedleak.federation.results import FederationResult
from fedleak.report.output import write_atomic


def render_report(result: FederationResult) -> str:
    """The federation's ``report.html``."""
    from fedleak.report.federation import render_federation

    return render_federation(result)


def write_report(result: FederationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``report.html`` atomically."""
    return write_atomic(Path(path), render_report(result))


def write_results(result: FederationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``results.json`` atomically."""
    return write_atomic(Path(path), json.dumps(result.to_dict(), indent=1))
