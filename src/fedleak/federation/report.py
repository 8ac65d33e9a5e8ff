"""``report.html`` of a federation run: leakage and utility over rounds, per-client images.

Self-contained and offline: figures are drawn with matplotlib's Agg backend and inlined as base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

from fedleak.federation.results import FederationResult
from fedleak.metrics import EXACT_TOL
from fedleak.report.output import write_atomic


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _curves(result: FederationResult) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    rounds = [r.round for r in result.rounds]
    ax.plot(rounds, [r.test_accuracy for r in result.rounds], "k-o", label="test accuracy (global model)")
    clients = sorted({c.client for c in result.records})
    for cl in clients:
        pts = [(c.round, c.scores.recovered_fraction) for c in result.records
               if c.client == cl and c.scores is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "--.", alpha=0.8, label=f"recovered fraction, client {cl}")
    ax.set_xlabel("round")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(rounds)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def _images(record) -> str | None:
    if record.scores is None or not record.scores.preview:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from fedleak.report.figures import FRAME_COLOURS, to_display

    pairs = record.scores.preview
    value_range = record.scores.value_range or (0.0, 1.0)
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.1 * len(pairs), 2.6), squeeze=False)
    for i, entry in enumerate(pairs):
        orig, rec, status, reason = (*entry, "", "")[:4] if len(entry) < 4 else entry
        for row, img in ((0, orig), (1, rec)):
            ax = axes[row][i]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if img is None:
                ax.text(0.5, 0.5, "not in\nthe batch" if row == 0 else "not\nrecovered", ha="center",
                        va="center", fontsize=7, transform=ax.transAxes)
                continue
            hwc = to_display(np.asarray(img), value_range)  # rescaled from the data range, for display only
            ax.imshow(hwc, cmap="gray" if hwc.ndim == 2 else None, vmin=0, vmax=1)
            if row == 1 and status:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_edgecolor(FRAME_COLOURS[status])
                    spine.set_linewidth(3.5 if status == "false" else 2.5)
            if row == 1 and status == "false":
                ax.set_xlabel("FALSE\nCERTIFICATE", fontsize=6, color=FRAME_COLOURS["false"])
    axes[0][0].set_title("client data", fontsize=7, loc="left")
    axes[1][0].set_title("server's certified reconstruction (red: false certificate)", fontsize=7, loc="left")
    return _png(fig)


def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.1%}" if pct else (f"{x:.1f}" if isinstance(x, float) else str(x))


def render_report(result: FederationResult) -> str:
    s = result.settings
    e = html.escape
    rows = []
    for r in result.rounds:
        recs = [c for c in result.records if c.round == r.round and c.scores is not None]
        frac = float(np.mean([c.scores.recovered_fraction for c in recs])) if recs else None
        rows.append(f"<tr><td>{r.round}</td><td>{_fmt(r.test_accuracy, True)}</td><td>{_fmt(frac, True)}</td>"
                    f"<td>{r.clients_ok}</td><td>{r.clients_skipped}</td><td>{_fmt(r.seconds)}</td></tr>")
    client_rows = []
    for c in result.records:
        sc = c.scores
        false_cell = (f"<td class=bad>{sc.false_certificates}</td>" if sc and sc.false_certificates
                      else f"<td>{sc.false_certificates if sc else '–'}</td>")
        client_rows.append(
            f"<tr><td>{c.round}</td><td>{c.client}</td><td>{e(c.status)}</td><td>{_fmt(c.num_examples)}</td>"
            f"<td>{_fmt(sc.recovered_fraction, True) if sc else '–'}</td>{false_cell}"
            f"<td>{_fmt(sc.psnr) if sc else '–'}</td>"
            f"<td>{_fmt(sc.label_accuracy, True) if sc else '–'}</td><td>{_fmt(c.attack_seconds)}</td>"
            f"<td class=d>{e(c.detail[:300])}</td></tr>")
    figures = []
    for c in result.records:
        img = _images(c)
        if img:
            reasons = "".join(f"<br><span class=bad>{e(r)}</span>" for r in c.scores.false_certificate_reasons)
            figures.append(f"<figure><img src='{img}' alt='round {c.round} client {c.client}'>"
                           f"<figcaption>round {c.round}, client {c.client}: "
                           f"{_fmt(c.scores.recovered_fraction, True)} recovered{reasons}</figcaption></figure>")
    scored = [c.scores for c in result.records if c.scores is not None]
    false_total = sum(sc.false_certificates for sc in scored)
    verdict = ("<span class=good>no false certificate</span>" if not false_total
               else f"<span class=bad>{false_total} FALSE CERTIFICATE(S)</span>")
    ranges = sorted({tuple(sc.value_range) for sc in scored if sc.value_range is not None})
    range_text = ("; ".join(f"[{lo:g}, {hi:g}]" for lo, hi in ranges) if ranges else "the batch's own range")
    settings = ", ".join(f"{k}={e(str(v))}" for k, v in s.items())
    versions = ", ".join(f"{k} {e(v)}" for k, v in result.versions.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedleak federation audit</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
td.d{{text-align:left;font-size:11px;color:#555}}figure{{display:inline-block;margin:6px}}
figcaption{{font-size:12px}}.s{{font-size:12px;color:#555}}.bad{{color:#b2182b;font-weight:bold}}
.good{{color:#1a9850}}</style></head><body>
<h1>Federation audit: {e(str(s.get('threat')))} server, defense {e(str(s.get('defense')))}</h1>
<p class=s>{settings}<br>{versions}; {result.seconds:.1f} s wall.</p>
<p>Leakage counts a sample as <b>recovered</b> only when the server's attack certified it and it equals the
client's sample (max abs error at most {EXACT_TOL:g} of the data range, {e(range_text)}; right label). Every
certified sample is checked: one that is not a distinct sample of the client's batch (a blend, a wrong label,
a second copy, more than the batch holds) is a <b>false certificate</b>. Certificates: {verdict}. Scores come
from an evaluation-only side channel the attack never reads.</p>
<h2>Leakage and utility over rounds</h2><img src="{_curves(result)}" alt="leakage over rounds">
<table><tr><th>round</th><th>test accuracy</th><th>mean recovered</th><th>clients audited</th>
<th>clients skipped</th><th>round s</th></tr>{''.join(rows)}</table>
<h2>Per round and client</h2>
<table><tr><th>round</th><th>client</th><th>status</th><th>batch</th><th>recovered</th><th>false cert.</th><th>PSNR dB</th>
<th>label acc.</th><th>attack s</th><th>detail</th></tr>{''.join(client_rows)}</table>
<h2>Images</h2>{''.join(figures) or '<p>No images.</p>'}
</body></html>
"""


def write_report(result: FederationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``report.html`` atomically."""
    return write_atomic(Path(path), render_report(result))


def write_results(result: FederationResult, path: str | os.PathLike[str]) -> Path:
    """Write ``results.json`` atomically."""
    import json

    return write_atomic(Path(path), json.dumps(result.to_dict(), indent=1))
