"""The audit's outputs: ``results.json`` (settings, versions, seed, per-sample scores and reasons, summary,
timings) and a self-contained ``report.html`` (inline images; opens offline), rendered by
:mod:`fedleak.report.audit`."""

from __future__ import annotations

import os
from pathlib import Path

from fedleak.audit.run import AuditResult
from fedleak.report.output import RESULTS_AND_REPORT, environment_info, write_results_and_report


def results_payload(result: AuditResult) -> dict[str, object]:
    """Everything ``results.json`` holds."""
    s = result.settings
    return {
        "kind": "fedleak-audit",
        "seed": s.seed,
        "settings": s.to_dict(),
        "environment": environment_info(),
        "data": {"name": result.dataset, "input_shape": list(result.input_shape), "num_classes": result.num_classes,
                 "value_range": list(result.value_range)},
        "summary": result.summary_rows(),
        "reconstructable_batch_size": result.reconstructable_batch_size(),
        "batches": [b.to_dict() for b in result.batches],
        "timings": {"total_seconds": result.seconds},
        "notes": list(result.notes),
    }


def render_html(result: AuditResult) -> str:
    """The audit's ``report.html``: a verdict, what to do, then the evidence (see :mod:`fedleak.report.audit`)."""
    from fedleak.report.audit import render_audit

    return render_audit(result)


OUTPUT_FILES = RESULTS_AND_REPORT


def write_audit(result: AuditResult, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out``: both rendered first, then written all-or-nothing
    (a failure leaves ``out`` as it was, with no half-written pair and no empty folder)."""
    payload = results_payload(result)
    page = render_html(result)
    return write_results_and_report(out, payload, page)
