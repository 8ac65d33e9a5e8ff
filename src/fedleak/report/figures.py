"""Matplotlib figures for the reports, as inline ``data:`` URIs (offline HTML). Every axis is labelled.

matplotlib is imported (Agg backend) when a figure is drawn, not when this module is imported.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Series:
    """One curve. ``group`` picks the colour (one per group); ``style``: "measured" (solid, dots),
    "predicted" (dashed, crosses) or "points" (hollow markers, no line: e.g. batches the client withheld)."""

    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    group: str = ""
    style: str = "measured"


@dataclass(frozen=True)
class Panel:
    """One small-multiple panel: a title and its curves."""

    title: str
    series: tuple[Series, ...]


_STYLES = {
    "measured": {"marker": "o", "linestyle": "-"},
    "predicted": {"marker": "x", "linestyle": "--"},
    "points": {"marker": "s", "linestyle": "none", "markerfacecolor": "none", "markersize": 8},
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig) -> str:
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _draw(ax, series: Sequence[Series], colours: dict[str, str], palette: list[str]) -> None:
    for s in series:
        colour = colours.setdefault(s.group or s.label, palette[len(colours) % len(palette)])
        ax.plot(list(s.xs), list(s.ys), label=s.label, color=colour, **_STYLES[s.style])


def line_plot_uri(series: Sequence[Series], xlabel: str, ylabel: str, *, logx: bool = True,
                  ylim: tuple[float, float] | None = None, title: str = "",
                  size: tuple[float, float] = (6.4, 3.6)) -> str:
    """One axes with every series, a legend and both axes labelled; a tick at every x of the data."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    _draw(ax, series, {}, plt.rcParams["axes.prop_cycle"].by_key()["color"])
    if logx:
        ax.set_xscale("log", base=2)
    xs = sorted({x for s in series for x in s.xs})
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.minorticks_off()
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure_uri(fig)


def panels_uri(panels: Sequence[Panel], xlabel: str, ylabel: str, *, ylim: tuple[float, float] | None = None,
               xticks: Sequence[float] | None = None, columns: int = 4) -> str:
    """Small multiples: one panel per entry (same axes, same colours per series group), each axis labelled,
    one legend for all."""
    plt = pyplot()
    n = max(1, len(panels))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.6, 2.4 * rows + 0.4), squeeze=False,
                             sharey=True)
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        _draw(ax, panels[k].series, colours, palette)
        ax.set_title(panels[k].title, fontsize=9)
        if ylim:
            ax.set_ylim(*ylim)
        if xticks is not None:
            ax.set_xticks(list(xticks))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7, labelleft=True)
        ax.grid(alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=min(4, len(labels)),
                   fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.05 * (len(labels) > 4)), frameon=False)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 1))
    return figure_uri(fig)


def histogram_uri(counts_per_layer: list[np.ndarray], layer_names: list[str], max_count: int = 10) -> str:
    """Bar chart: how many samples have 0, 1, ..., >= max_count ExANs, one group of bars per layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    width = 0.8 / max(1, len(counts_per_layer))
    bins = np.arange(max_count + 1)
    for k, (counts, name) in enumerate(zip(counts_per_layer, layer_names)):
        hist = np.bincount(np.minimum(np.asarray(counts, dtype=int), max_count), minlength=max_count + 1)
        ax.bar(bins + k * width - 0.4 + width / 2, hist, width=width, label=f"ReLU layer {name}")
    ax.set_xticks(bins)
    ax.set_xticklabels([str(b) for b in bins[:-1]] + [f"≥{max_count}"])
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("effective ExANs per sample")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return figure_uri(fig)
