"""Small matplotlib helpers that turn figures and image grids into inline ``data:`` URIs (offline HTML)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _to_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3:
        img = img.transpose(1, 2, 0)
        if img.shape[2] == 1:
            img = img[:, :, 0]
    return img


# frame colours: certified and sound, a false certificate (certified but wrong), not certified
# ("not-certified": the red of the older two-colour frames, used when only ``marks`` is given)
FRAME_COLOURS = {"certified": "#1a9850", "false": "#d73027", "uncertified": "#999999", "not-certified": "#d73027"}


def to_display(img: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """An image (C x H x W or H x W) as H x W (x C) on [0, 1] for display: rescaled from the data's
    ``value_range`` (lo -> 0, hi -> 1). Only what is drawn saturates at the range's ends; the data and
    every score stay unclamped."""
    lo, hi = (float(v) for v in value_range)
    out = (_to_hwc(img) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


def image_rows_uri(rows: list[tuple[str, np.ndarray]], marks: np.ndarray | None = None,
                   titles: list[str] | None = None, max_cols: int = 16, *,
                   value_range: tuple[float, float] = (0.0, 1.0), status: list[str] | None = None,
                   notes: list[str] | None = None) -> str:
    """A grid with one labelled row per image set (N x C x H x W each); NaN images are shown blank.

    Images are drawn on the data's ``value_range`` (see :func:`to_display`). The images of the last row
    get a frame: by ``status`` (per column: ``"certified"`` green, ``"false"`` red for a false
    certificate, ``"uncertified"`` grey, ``""`` none), or, when only ``marks`` (bool, N) is given, green
    where certified and red where not. ``notes`` (per column, e.g. why a certificate is false) are
    written under the last row in red.
    """
    n = min(max_cols, rows[0][1].shape[0])
    if status is None and marks is not None:
        status = ["certified" if m else "not-certified" for m in marks]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n + 1.2, 1.15 * len(rows) + (0.35 if notes else 0)),
                             squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = images[c]
            if np.isfinite(img).all():
                hwc = to_display(img, value_range)
                ax.imshow(hwc, cmap="gray" if hwc.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "—", ha="center", va="center", transform=ax.transAxes, color="#999")
            if r == len(rows) - 1 and status is not None and status[c]:
                for spine in ax.spines.values():
                    spine.set_edgecolor(FRAME_COLOURS[status[c]])
                    spine.set_linewidth(3.5 if status[c] == "false" else 2.5)
            if r == len(rows) - 1 and notes is not None and notes[c]:
                ax.set_xlabel(notes[c], fontsize=6, color=FRAME_COLOURS["false"], wrap=True)
            if r == 0 and titles is not None:
                ax.set_title(titles[c], fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.1)
    return figure_uri(fig)


def line_plot_uri(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                  logx: bool = True, ylim: tuple[float, float] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, (xs, ys) in series.items():
        dashed = "certifiable" in name or "gradient" in name
        key = name.split(":")[0]  # one colour per scenario; solid = measured, dashed = predicted/baseline
        colour = colours.setdefault(key, palette[len(colours) % len(palette)])
        ax.plot(xs, ys, marker="x" if dashed else "o", linestyle="--" if dashed else "-", label=name, color=colour)
    if logx:
        ax.set_xscale("log", base=2)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_uri(fig)


def histogram_uri(counts_per_layer: list[np.ndarray], layer_names: list[str], max_count: int = 10) -> str:
    """Bar chart: how many samples have 0, 1, ..., >= max_count ExANs, one group of bars per layer."""
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    width = 0.8 / max(1, len(counts_per_layer))
    bins = np.arange(max_count + 1)
    for k, (counts, name) in enumerate(zip(counts_per_layer, layer_names)):
        hist = np.bincount(np.minimum(np.asarray(counts, dtype=int), max_count), minlength=max_count + 1)
        ax.bar(bins + k * width - 0.4 + width / 2, hist, width=width, label=f"ReLU layer {name}")
    ax.set_xticks(bins)
    ax.set_xticklabels([str(b) for b in bins[:-1]] + [f"≥{max_count}"])
    ax.set_xlabel("effective ExANs per sample")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return figure_uri(fig)
