"""The audit's outputs: ``results.json`` (settings, versions, seed, per-sample scores, summary, timings)
and a self-contained ``report.html`` (inline images; opens offline)."""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np

from fedleak.audit.run import AuditResult, Showcase
from fedleak.metrics import EXACT_TOL
from fedleak.report.figures import histogram_uri, image_rows_uri, line_plot_uri
from fedleak.report.output import environment_info, staged_output, write_atomic, write_json

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} .bad{color:#b2182b;font-weight:bold} .good{color:#1a9850}
.note{color:#555;font-size:.9em} img{max-width:100%} code{background:#f4f4f4;padding:0 .2em}
"""


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


def _fmt(value, digits: int = 2, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if pct:
        return f"{100 * value:.0f}%"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _short(reason: str) -> str:
    """A few words for the image grid; the full reason is listed under it."""
    if "wrong label" in reason:
        return "FALSE: wrong label"
    if "second certified copy" in reason:
        return "FALSE: duplicate"
    return "FALSE: no such sample"


def _showcase_html(show: Showcase, max_cols: int = 16) -> str:
    """The image grid of one showcase batch (false certificates first when it has to be cut) and its legend."""
    n = len(show.rebuilt)
    status = list(show.status) or ["certified" if c else "uncertified" for c in show.certified]
    reasons = list(show.reasons) or [""] * n
    bad = [c for c in range(n) if status[c] == "false"]
    cols = list(range(n)) if n <= max(max_cols, len(bad)) else sorted(
        bad + [c for c in range(n) if status[c] != "false"][: max_cols - len(bad)])
    image_rows = [("original", show.originals[cols])]
    if show.scenario != "plain":
        image_rows.append(("sent by client", show.sent[cols]))
    image_rows.append(("rebuilt", show.rebuilt[cols]))
    titles = [("y=" + str(int(show.labels[c])) if show.labels[c] >= 0 else "not in batch")
              + (f"→{int(show.rebuilt_labels[c])}" if show.rebuilt_labels[c] >= 0 else "") for c in cols]
    uri = image_rows_uri(image_rows, titles=titles, max_cols=len(cols), value_range=show.value_range,
                         status=[status[c] for c in cols], notes=[_short(reasons[c]) if reasons[c] else "" for c in cols])
    lo, hi = show.value_range
    out = [f"<img alt='image grid' src='{uri}'>",
           "<p class='note'>Green frame: certified and correct; <span class='bad'>red: FALSE CERTIFICATE</span> "
           "(certified, but not a distinct sample of the batch); grey: not certified; blank: not rebuilt. "
           f"Titles: true label → rebuilt label. Images are shown on the data's range [{lo:g}, {hi:g}]"
           + (f"; {n - len(cols)} column(s) not shown" if len(cols) < n else "") + ".</p>"]
    if bad:
        out.append("<ul>" + "".join(f"<li class='bad'>{html.escape(reasons[c])}</li>" for c in bad) + "</ul>")
    return "\n".join(out)


def render_html(result: AuditResult) -> str:
    s = result.settings
    rows = result.summary_rows()
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedleak audit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>fedleak audit: what the server can rebuild from FedSGD gradients</h1>",
        f"<p>Data <b>{e(result.dataset)}</b> ({'×'.join(map(str, result.input_shape))}, {result.num_classes} classes); "
        + (f"model: <code>{e(s.model)}</code>; " if s.model else
           f"model: CNN with 3×3 conv channels {e(str(list(s.conv)))} (padding 1) and an FC head {e(str(list(s.widths)))}; "
           if s.conv else
           f"model: fully connected ReLU net, hidden widths {e(str(list(s.widths)))}, "
           f"{'with' if s.bias else 'without'} biases; ")
        + f"attack <code>{e(s.attack)}</code>; seed {s.seed}; "
        f"{s.trials} batch(es) per size; run time {result.seconds:.1f} s.</p>",
    ]
    lo, hi = result.value_range
    tol = EXACT_TOL * (hi - lo)
    false_total = sum(r["false_certificates"] for r in rows)
    verdict = ("<span class='good'>no false certificate</span>" if false_total == 0
               else f"<span class='bad'>{false_total} FALSE CERTIFICATE(S)</span>")
    parts.append(f"<p>Certificates: {verdict}. Every certified sample is checked against the batch: it must be "
                 f"within max abs error {tol:.3g} ({EXACT_TOL:g} of the data range [{lo:g}, {hi:g}]) of an original "
                 "with the right label, and no two certified samples may claim the same original; any other "
                 "certified sample (a blend, a wrong label, a second copy, more than the batch holds) is a false "
                 "certificate.</p>")
    sizes = result.reconstructable_batch_size()
    parts.append("<p>Largest batch size with ≥ 99% of every batch recovered: " + "; ".join(
        f"<b>{e(k)}</b>: {v if v is not None else 'none'}" for k, v in sizes.items()) + ".</p>")
    parts.append("<h2>Recovered fraction by batch size</h2><table><tr><th class='l'>scenario</th><th>batch</th>"
                 "<th>certifiable (ExAN condition)</th><th>recovered (certified, exact)</th><th>exact</th>"
                 "<th>false cert.</th><th>label acc.</th><th>PSNR dB</th><th>PSNR vs original</th>"
                 "<th>perturbation L∞</th><th>sent vs original PSNR</th>"
                 "<th>gradient ms</th><th>attack ms</th><th>client transform ms</th></tr>")
    for r in rows:
        cls = " class='bad'" if r["false_certificates"] else ""
        parts.append(
            f"<tr><td class='l'>{e(r['scenario'])}</td><td>{r['batch_size']}</td>"
            f"<td>{_fmt(r['certifiable_fraction'], pct=True)}</td><td>{_fmt(r['recovered_fraction'], pct=True)}</td>"
            f"<td>{_fmt(r['exact_fraction'], pct=True)}</td><td{cls}>{r['false_certificates']}</td>"
            f"<td>{_fmt(r['label_accuracy'], pct=True)}</td><td>{_fmt(r['mean_psnr'], 1)}</td>"
            f"<td>{_fmt(r['psnr_vs_original'], 1)}</td><td>{_fmt(r['perturbation_linf'], 4)}</td>"
            f"<td>{_fmt(r['perturbation_psnr'], 1)}</td><td>{_fmt(r['gradient_ms'], 1)}</td>"
            f"<td>{_fmt(r['attack_ms'], 1)}</td><td>{_fmt(r['transform_ms'], 1)}</td></tr>"
        )
    parts.append("</table><p class='note'>PSNR is the standard definition with the data's range "
                 f"[{lo:g}, {hi:g}] (data range {hi - lo:g}), per image, over matched samples, capped at "
                 "100 dB; nothing is clamped. 'Recovered' is measured against what the "
                 "client sent (for fished batches, the perturbed images); 'PSNR vs original' against the "
                 "unperturbed batch.</p>")
    if len(s.batch_sizes) > 1:
        series, series_cert = {}, {}
        for scenario in s.scenarios:
            sub = [r for r in rows if r["scenario"] == scenario]
            series[f"{scenario}: recovered"] = ([r["batch_size"] for r in sub], [r["recovered_fraction"] for r in sub])
            series_cert[f"{scenario}: certifiable"] = ([r["batch_size"] for r in sub],
                                                       [r["certifiable_fraction"] for r in sub])
        uri = line_plot_uri({**series, **series_cert}, "batch size", "fraction of the batch", ylim=(-0.03, 1.03))
        parts.append(f"<img alt='recovered fraction vs batch size' src='{uri}'>")
        timing = {f"{sc}: attack": ([r["batch_size"] for r in rows if r["scenario"] == sc],
                                     [r["attack_ms"] for r in rows if r["scenario"] == sc]) for sc in s.scenarios}
        timing["gradient (client)"] = ([r["batch_size"] for r in rows if r["scenario"] == s.scenarios[0]],
                                       [r["gradient_ms"] for r in rows if r["scenario"] == s.scenarios[0]])
        parts.append(f"<img alt='time vs batch size' src='{line_plot_uri(timing, 'batch size', 'milliseconds')}'>")
    for show in result.showcases:
        parts.append(f"<h2>Batch of {show.batch_size} ({e(show.scenario)}): originals and reconstructions</h2>")
        parts.append(_showcase_html(show))
    false_rows = [(b, j, reason) for b in result.batches
                  for j, bad, reason in zip(b.certificates.get("certified_index", []),
                                            b.certificates.get("certified_false", []),
                                            b.certificates.get("certified_reason", [])) if bad]
    if false_rows:
        parts.append("<h2 class='bad'>False certificates</h2><ul>" + "".join(
            f"<li class='bad'>{e(b.scenario)}, batch {b.batch_size}, trial {b.trial}: {e(reason)}</li>"
            for b, j, reason in false_rows) + "</ul>")
    # ExAN histogram for the showcase size (or the first batch) of each scenario
    for scenario in s.scenarios:
        batch = next((b for b in result.batches if b.scenario == scenario
                      and b.batch_size == (result.showcases[0].batch_size if result.showcases else b.batch_size)), None)
        if batch is None:
            continue
        names = [str(i + 1) for i in range(len(batch.exan_counts))]
        uri = histogram_uri([np.asarray(c) for c in batch.exan_counts], names)
        parts.append(f"<h2>Exclusively activated neurons per sample ({e(scenario)}, batch {batch.batch_size})</h2>"
                     f"<img alt='ExAN histogram' src='{uri}'><p class='note'>A sample is certifiable with ≥2 "
                     "effective ExANs at the last ReLU layer and ≥1 at every other one.</p>")
    env = environment_info()
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    parts.append(f"<h2>Provenance</h2><p class='note'>Python {e(env['python'])} on {e(env['platform'])}; "
                 f"{e(pkgs)}. Settings and per-sample scores are in results.json.</p></body></html>")
    return "\n".join(parts)


OUTPUT_FILES = ("results.json", "report.html")


def write_audit(result: AuditResult, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out``: both rendered first, then written all-or-nothing
    (a failure leaves ``out`` as it was, with no half-written pair and no empty folder)."""
    payload = results_payload(result)
    page = render_html(result)
    with staged_output(out, OUTPUT_FILES) as stage:
        write_atomic(stage / "report.html", page)
        write_json(stage / "results.json", payload)
    folder = Path(out)
    return folder / "results.json", folder / "report.html"
