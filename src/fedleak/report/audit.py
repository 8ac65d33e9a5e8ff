"""The audit report's view model: a verdict, what to do, and per scenario the evidence (table, reasons, images).

:func:`build_audit_view` turns an :class:`~fedleak.audit.AuditResult` into an :class:`AuditView`;
:func:`render_audit` renders it with ``audit.html``. The verdict and the advice are in
:mod:`fedleak.report.audit_story`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedleak.audit.run import AuditResult, BatchResult, Showcase, available_scenarios
from fedleak.metrics import EXACT_TOL
from fedleak.report.audit_story import AuditRow, ScenarioRows, advice, threat_of, verdict
from fedleak.report.figures import Series, histogram_uri, line_plot_uri
from fedleak.report.grid import image_grid, sample_list
from fedleak.report.render import render
from fedleak.report.views import (
    STATUS_TEXT,
    Advice,
    Column,
    Figure,
    ImageGrid,
    Provenance,
    ReasonGroup,
    Setting,
    Verdict,
    provenance,
)


@dataclass(frozen=True)
class ReasonRow:
    """Why samples of one batch size were not recovered: the reasons, grouped."""

    batch_size: int
    groups: tuple[ReasonGroup, ...]


@dataclass(frozen=True)
class ScenarioSection:
    name: str
    title: str
    description: str
    columns: tuple[Column, ...]
    rows: tuple[AuditRow, ...]
    perturbs: bool  # the client's batch is changed (show what it sent)
    reasons: tuple[ReasonRow, ...]
    grids: tuple[ImageGrid, ...]
    histogram: Figure | None


@dataclass(frozen=True)
class AuditView:
    title: str
    subtitle: str
    verdict: Verdict
    certificate_note: str
    advice: tuple[Advice, ...]
    curve: Figure | None
    sections: tuple[ScenarioSection, ...]
    false_certificates: tuple[str, ...]
    settings: tuple[Setting, ...]
    provenance: Provenance
    status_text: dict[str, str]


def _columns(perturbs: bool, tol: str) -> tuple[Column, ...]:
    cols = [
        Column("batch", "samples in the client's batch for one update (the numbers sum over the trials)", left=True),
        Column("sent", "samples the client's update covers; the others were withheld by the client (a defense "
                       "that could not protect them leaves them out)"),
        Column("certifiable", "sent samples that meet the ExAN condition (≥2 effective exclusively activated "
                              "neurons at the last ReLU layer, ≥1 at the others): what the exact attack can prove"),
        Column("certified & exact", "rebuilt, certified by the attack and verified here to equal the sample sent "
                                    f"(max abs error ≤ {tol}, right label): the proven leak; % of the batch"),
        Column("uncertified", "rebuilt and matched to a sample, but without a certificate: the server cannot tell "
                              "these from wrong guesses"),
        Column("… in fact exact", "of the uncertified, those within the exactness tolerance of their original "
                                  "(known here from the originals, not to the server)"),
        Column("uncertified PSNR dB", "mean PSNR of the uncertified reconstructions against their originals "
                                      "(estimated, uncertified); blank when there are none; capped at 100 dB"),
        Column("not rebuilt", "sent samples the attack returned nothing for"),
        Column("label acc.", "share of the batch's labels found among the rebuilt labels (order-free)"),
        Column("false cert.", "certified samples that are not a distinct sample of the batch; must be 0"),
    ]
    if perturbs:
        cols.append(Column("sent vs data PSNR dB", "mean PSNR of what the client sent against its data: the "
                                                   "perturbation's size (≥100: unchanged; lower: more changed)"))
        cols.append(Column("client ms", "time of the client's transform per batch"))
    cols.append(Column("attack ms", "time of the server's attack per batch"))
    return tuple(cols)


def _mean(values: list[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _row(group: list[BatchResult]) -> AuditRow:
    status = [s for b in group for s in b.per_sample.get("status", [])]
    exact = [bool(e) for b in group for e in b.per_sample.get("exact", [])]
    psnr = [p for b in group for p in b.per_sample.get("psnr", [])]
    unc = [i for i, s in enumerate(status) if s == "uncertified"]
    sent = sum(b.sent if b.sent is not None else b.batch_size for b in group)
    return AuditRow(
        batch_size=group[0].batch_size, trials=len(group), total=sum(b.batch_size for b in group), sent=sent,
        certifiable=None if any(b.certifiable is None for b in group) else sum(b.certifiable for b in group),
        recovered=sum(b.recovered for b in group),
        uncertified=len(unc), uncertified_exact=sum(exact[i] for i in unc),
        uncertified_psnr=_mean([psnr[i] for i in unc]), missing=status.count("missing"),
        false_certificates=sum(b.false_certificates for b in group),
        label_accuracy=_mean([b.label_accuracy for b in group if b.sent]),
        perturbation_psnr=_mean([b.perturbation_psnr for b in group]),
        attack_ms=_mean([1000 * b.attack_seconds for b in group if b.sent]),
        transform_ms=_mean([1000 * b.transform_seconds for b in group]),
    )


def _reasons(group: list[BatchResult]) -> ReasonRow:
    """Every sample of the batches that was not recovered, grouped by status and reason (numbers of trial 0;
    counts over every trial)."""
    merged: dict[tuple[str, str], tuple[list[int], int]] = {}
    for b in group:
        numbers = list(b.per_sample.get("original", []))
        statuses = list(b.per_sample.get("status", []))
        reasons = list(b.per_sample.get("reason", []))
        numbers += b.withheld.get("index", [])
        statuses += ["withheld"] * len(b.withheld.get("index", []))
        reasons += b.withheld.get("reason", [])
        for n, s, r in zip(numbers, statuses, reasons):
            if s == "certified":
                continue
            members, count = merged.get((s, r), ([], 0))
            merged[(s, r)] = (members + [n] if b.trial == 0 else members, count + 1)
    order = sorted(merged.items(), key=lambda kv: (kv[0][0] != "false", -kv[1][1]))
    groups = tuple(ReasonGroup("", s, r, (sample_list(m) + (" in trial 0" if len(group) > 1 else "")) if m
                               else "other trials", c) for (s, r), (m, c) in order)
    return ReasonRow(group[0].batch_size, groups)


def _caption(show: Showcase, c: int) -> str:
    true = f"y={int(show.labels[c])}" if show.labels[c] >= 0 else "not in batch"
    return true + (f" → {int(show.rebuilt_labels[c])}" if show.rebuilt_labels[c] >= 0 else "")


def _grid(show: Showcase, row: AuditRow, threat: str) -> ImageGrid:
    rows = [("original", show.originals)]
    if show.scenario != "plain":
        rows.append(("sent by the client", show.sent))
    rows.append(("rebuilt by the server", show.rebuilt))
    counts = {s: show.status.count(s) for s in STATUS_TEXT}
    parts = [f"{counts['certified']} certified"] + [f"{counts[s]} {w}" for s, w in (
        ("false", "FALSE certificate(s)"), ("uncertified", "uncertified"), ("missing", "not rebuilt"),
        ("withheld", "withheld")) if counts[s]]
    title = f"Batch of {show.batch_size} ({threat.lower()}): " + ", ".join(parts)
    return image_grid(title, rows, show.status, show.reasons, [_caption(show, c) for c in range(len(show.status))],
                      batch_size=show.batch_size, value_range=show.value_range)


def _chosen_sizes(rows: list[AuditRow]) -> list[int]:
    """Batch sizes to draw: where leakage is partial, plus the largest fully recovered one; when there is neither,
    the smallest batch the client sent (to show what it sent)."""
    sizes = [r.batch_size for r in rows if r.state == "partial"]
    full = [r.batch_size for r in rows if r.state == "full"]
    if full:
        sizes.append(max(full))
    if not sizes:
        sent = [r.batch_size for r in rows if r.sent]
        sizes = [min(sent)] if sent else []
    return sorted(set(sizes))


def _defenses(result: AuditResult) -> tuple[str, ...]:
    """The audit's defense scenarios (their stacks' labels)."""
    s = result.settings
    return s.scenario_names[len(s.scenarios):]


def _privacy(batches: list[BatchResult]) -> str:
    """The defense's (ε, δ) for one FedSGD update (batch sizes with the same guarantee together), or that it gives
    none."""
    sizes: dict[tuple, list[int]] = {}
    for b in sorted(batches, key=lambda b: b.batch_size):
        for p in (b.privacy if b.trial == 0 else []):
            sizes.setdefault(tuple(p[k] for k in ("epsilon", "delta", "unit", "accountant", "mechanism")), []).append(
                b.batch_size)
    if not sizes:
        return "No formal privacy guarantee."
    return "Privacy: " + "; ".join(
        f"ε = {eps:.3g} at δ = {delta:.3g} per {unit} (batch {', '.join(map(str, at))}; {accountant}: {mechanism})"
        for (eps, delta, unit, accountant, mechanism), at in sizes.items()) + "."


def _section(result: AuditResult, scenario: str, rows: list[AuditRow], tol: str) -> ScenarioSection:
    groups = {size: [b for b in result.batches if b.scenario == scenario and b.batch_size == size]
              for size in (r.batch_size for r in rows)}
    reasons = tuple(rr for rr in (_reasons(groups[r.batch_size]) for r in rows) if rr.groups)
    threat = threat_of(scenario, _defenses(result))
    shows = {s.batch_size: s for s in result.showcases if s.scenario == scenario}
    by_size = {r.batch_size: r for r in rows}
    grids = tuple(_grid(shows[size], by_size[size], threat) for size in _chosen_sizes(rows) if size in shows)
    histogram = None
    size = next((r.batch_size for r in rows if r.state == "partial"), next(iter(_chosen_sizes(rows)), None))
    batch = next((b for b in groups.get(size, []) if b.sent), None)
    if batch is not None and batch.exan_counts and any(len(c) for c in batch.exan_counts):
        uri = histogram_uri([np.asarray(c) for c in batch.exan_counts],
                            [str(i + 1) for i in range(len(batch.exan_counts))])
        histogram = Figure(uri, "ExAN histogram", f"Exclusively activated neurons per sample ({threat.lower()}, "
                           f"batch of {batch.batch_size}). A sample is certifiable with ≥2 effective ExANs at the "
                           "last ReLU layer and ≥1 at every other one.")
    perturbs = any(r.perturbation_psnr is not None for r in rows) or any(r.withheld for r in rows)
    about = result.descriptions.get(scenario) or available_scenarios().get(scenario, "")
    if scenario in _defenses(result):
        about += " " + _privacy([b for g in groups.values() for b in g])
    return ScenarioSection(scenario, threat, about, _columns(perturbs, tol), tuple(rows), perturbs, reasons, grids,
                           histogram)


def _curve(rows: dict[str, list[AuditRow]], defenses: tuple[str, ...]) -> Figure | None:
    if max((len(v) for v in rows.values()), default=0) < 2:
        return None
    series = []
    for scenario, sub in rows.items():
        name = threat_of(scenario, defenses).lower()
        sent = [r for r in sub if r.sent]
        series.append(Series(f"{name}: certified & exact", tuple(r.batch_size for r in sent),
                             tuple(r.recovered_fraction for r in sent), group=scenario))
        counted = [r for r in sent if r.certifiable is not None]  # a model the analysis reads
        if counted:
            series.append(Series(f"{name}: certifiable (ExAN condition)", tuple(r.batch_size for r in counted),
                                 tuple(r.certifiable_fraction for r in counted), group=scenario, style="predicted"))
        gone = [r for r in sub if not r.sent]
        if gone:
            series.append(Series(f"{name}: batch withheld (nothing sent)", tuple(r.batch_size for r in gone),
                                 tuple(0.0 for _ in gone), group=scenario, style="points"))
    uri = line_plot_uri(series, "batch size (samples per update)", "fraction of the client's batch",
                        ylim=(-0.04, 1.04))
    return Figure(uri, "recovered fraction by batch size", "Solid: certified and verified equal to the original; "
                  "dashed: certifiable by the ExAN condition. Hollow squares: batches the client withheld entirely "
                  "(no update, so nothing to rebuild; not a measurement of 0% leaked).")


def _settings(result: AuditResult) -> tuple[Setting, ...]:
    s = result.settings
    lo, hi = result.value_range
    model = (f"{s.model}" + (f" (weights {s.weights})" if s.weights else "") if s.model else
             f"CNN: 3×3 conv channels {list(s.conv)} (padding 1), FC head {list(s.widths)}" if s.conv else
             f"fully connected ReLU network, hidden widths {list(s.widths)}, {'with' if s.bias else 'without'} biases")
    return (Setting("data", f"{result.dataset} ({'×'.join(map(str, result.input_shape))}, {result.num_classes} "
                            f"classes, value range [{lo:g}, {hi:g}])"),
            Setting("model", model), Setting("attack", s.attack),
            Setting("batch sizes", ", ".join(map(str, s.batch_sizes))), Setting("trials per size", str(s.trials)),
            Setting("scenarios", ", ".join(f"{n} ({threat_of(n, _defenses(result)).lower()})"
                                           for n in s.scenario_names)),
            Setting("seed", str(s.seed)), Setting("run time", f"{result.seconds:.1f} s"))


def build_audit_view(result: AuditResult) -> AuditView:
    s = result.settings
    lo, hi = result.value_range
    tol = f"{EXACT_TOL * (hi - lo):.3g}"
    rows: dict[str, list[AuditRow]] = {}
    defenses = _defenses(result)
    for scenario in s.scenario_names:
        sizes = sorted({b.batch_size for b in result.batches if b.scenario == scenario})
        rows[scenario] = [_row([b for b in result.batches if b.scenario == scenario and b.batch_size == size])
                          for size in sizes]
    stories = [ScenarioRows(name, threat_of(name, defenses), tuple(sub), name in defenses)
               for name, sub in rows.items() if sub]
    widths = "×".join(map(str, s.widths))
    false_rows = tuple(f"{threat_of(b.scenario, defenses)}, batch {b.batch_size}, trial {b.trial}: {reason}"
                       for b in result.batches
                       for bad, reason in zip(b.certificates.get("certified_false", []),
                                              b.certificates.get("certified_reason", [])) if bad)
    certified = sum(b.certified for b in result.batches)
    note = (f"Certified means proven by the attack from the update alone; every certified sample was then checked "
            f"here against the batch (max abs error ≤ {tol}, i.e. {EXACT_TOL:g} × the width of the data range "
            f"[{lo:g}, {hi:g}]; right label; no two claiming one original): {len(false_rows)} false certificate(s) "
            f"among {certified} "
            "certified samples. Uncertified reconstructions are estimates: the server has them but cannot tell "
            "right from wrong." + "".join(f" Note: {n[:1].upper()}{n[1:]}." for n in result.notes))
    net = f"model {s.model}" if s.model else (f"a CNN {list(s.conv)} + FC {widths}" if s.conv else f"width {widths}")
    model = f"with {net}" if s.model or s.conv else f"at {net}"  # a phrase: "leaks at width 1024"
    return AuditView(
        title="What a server can rebuild from this model's updates",
        subtitle=f"{result.dataset}, {net}, attack {s.attack}, {s.trials} batch(es) per size, seed {s.seed}",
        verdict=verdict(stories, false_rows, model), certificate_note=note,
        advice=advice(stories, model), curve=_curve(rows, defenses),
        sections=tuple(_section(result, name, sub, tol) for name, sub in rows.items() if sub),
        false_certificates=false_rows, settings=_settings(result),
        provenance=provenance(result.seconds, s.seed), status_text=STATUS_TEXT,
    )


def render_audit(result: AuditResult) -> str:
    """The audit's ``report.html``: self-contained (inline images), opens offline."""
    return render("audit.html", view=build_audit_view(result))


__all__ = ["AuditRow", "AuditView", "ReasonRow", "ScenarioSection", "build_audit_view", "render_audit"]
