"""The evaluation's outputs: ``results.json`` (settings, versions, seed, every cell, the per-setting rows, the
Pareto front) and a self-contained ``report.html`` with the leakage-utility Pareto plot and the tables."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedleak.evaluation.run import Evaluation
from fedleak.report.output import RESULTS_AND_REPORT, environment_info, write_results_and_report
from fedleak.report.views import Column, Figure, Provenance, provenance

OUTPUT_FILES = RESULTS_AND_REPORT

ROW_COLUMNS = (
    Column("defense", "the client's defense setting (none: the undefended baseline)", left=True),
    Column("best attack", "the attack that leaked most against it", left=True),
    Column("leaked", "originals whose best reconstruction reached the PSNR threshold (against each original as the "
                     "client's augmentation showed it, where it flips and shifts images)"),
    Column("certified exact", "originals rebuilt exactly under a sound certificate (the same way)"),
    Column("best PSNR", "mean PSNR of the best attack's matched reconstructions (dB)"),
    Column("labels", "label accuracy of the best attack"),
    Column("accuracy", "test accuracy after the federated training"),
    Column("Δ accuracy", "baseline accuracy minus this setting's"),
    Column("client time", "client compute per round, x the undefended client's"),
    Column("bytes sent", "bytes sent per round, x the undefended client's dense float32 update"),
    Column("ε", "the smallest ε among the setting's guarantees at the evaluation's δ (blank: none)"),
)


@dataclass(frozen=True)
class EvaluationView:
    title: str
    subtitle: str
    figure: Figure
    columns: tuple[Column, ...]
    rows: tuple[dict, ...]
    cell_rows: tuple[dict, ...]
    findings: tuple[str, ...]
    provenance: Provenance


def results_payload(ev: Evaluation) -> dict[str, object]:
    return {"kind": "fedleak-evaluation", "seed": ev.settings.seed, "environment": environment_info(),
            **ev.to_dict()}


def pareto_uri(ev: Evaluation) -> str:
    """Leakage (best attack's leaked fraction) against test accuracy, one point per setting; the front joined."""
    from fedleak.report.figures import figure_uri, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    front = set(ev.pareto)
    for r in ev.rows:
        on = r.defense in front
        ax.scatter(r.utility.accuracy, r.best.leaked_fraction, s=38 if on else 22,
                   color="#1a7f37" if on else "#8c959f", zorder=3)
        ax.annotate(r.defense, (r.utility.accuracy, r.best.leaked_fraction), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    pts = sorted((r.utility.accuracy, r.best.leaked_fraction) for r in ev.rows if r.defense in front)
    if len(pts) > 1:
        ax.plot(*zip(*pts), color="#1a7f37", lw=1, zorder=2)
    ax.set_xlabel("test accuracy after training (higher is better)")
    ax.set_ylabel("leaked fraction, best attack (lower is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def _view(ev: Evaluation) -> EvaluationView:
    s = ev.settings
    rows = []
    for r in ev.rows:
        d = r.to_dict()
        d["pareto"] = r.defense in ev.pareto
        rows.append(d)
    cells = tuple({"defense": c.defense, "attack": c.attack, "leaked": c.leaked_fraction,
                   "recovered": c.recovered_fraction, "psnr": c.psnr, "ssim": c.ssim, "labels": c.label_accuracy,
                   "false": c.false_certificates, "aware": c.defense_aware, "seconds": c.seconds,
                   "errors": "; ".join(sorted(set(c.errors)))} for r in ev.rows for c in r.leakage)
    findings = []
    base = ev.rows[0]
    for r in ev.rows[1:]:
        if r.best.leaked_fraction >= base.best.leaked_fraction * 0.9 and base.best.leaked_fraction > 0:
            findings.append(f"{r.defense}: leaks {r.best.leaked_fraction:.0%} to {r.best.attack} (undefended "
                            f"{base.best.leaked_fraction:.0%}) — no protection against this attack")
    subtitle = (f"{ev.dataset}, {ev.model}; leakage: {s.trials} batch(es) of {s.attack_batch} per setting, attacks "
                f"{', '.join(s.attacks)}, leaked at PSNR >= {s.leak_psnr:g} dB; utility: {s.rounds} rounds of "
                f"{s.clients} clients, each {s.training()}")
    figure = Figure(pareto_uri(ev), "leakage against utility", "Each point is a defense setting; green: the "
                    "Pareto front (no other setting leaks less and keeps more accuracy).")
    return EvaluationView("Defense evaluation: leakage, utility, cost", subtitle, figure, ROW_COLUMNS, tuple(rows),
                          cells, tuple(findings), provenance(ev.seconds, s.seed))


def render_html(ev: Evaluation) -> str:
    from fedleak.report.render import render

    return render("evaluation.html", view=_view(ev), isfinite=math.isfinite)


def write_evaluation(ev: Evaluation, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out``, all-or-nothing (``cells.jsonl`` stays)."""
    payload = results_payload(ev)
    page = render_html(ev)
    return write_results_and_report(out, payload, page)
