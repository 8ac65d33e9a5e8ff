"""ROC curves of membership attacks, on log-log axes (the low false-positive end is what matters), as a
matplotlib figure, a PNG data URI for HTML reports, or PNG bytes for files."""

from __future__ import annotations

import base64
from collections.abc import Mapping

from fedleak.membership.metrics import MembershipMetrics
from fedleak.report.figures import figure_uri, pyplot


def roc_figure(curves: Mapping[str, MembershipMetrics], title: str = ""):
    """One ROC curve per attack (label: name and AUC), log-log, with the chance diagonal."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    floor = 1e-3
    for name, metrics in curves.items():
        fpr = [max(v, floor) for v in metrics.fpr]
        tpr = [max(v, floor) for v in metrics.tpr]
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.auc:.3f})", linewidth=1.4)
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def roc_plot_uri(curves: Mapping[str, MembershipMetrics], title: str = "") -> str:
    """The ROC figure as a ``data:image/png;base64,...`` URI (for self-contained HTML reports)."""
    return figure_uri(roc_figure(curves, title))


def roc_png(curves: Mapping[str, MembershipMetrics], title: str = "") -> bytes:
    """The ROC figure as PNG bytes."""
    return base64.b64decode(roc_plot_uri(curves, title).split(",", 1)[1])
