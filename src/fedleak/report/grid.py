"""Image grids for the HTML reports: one card per sample (small inline PNGs, framed by status in CSS) and,
under the grid, the reason of every frame that is not green, samples with the same reason grouped.

Images are drawn on the data's value range (:func:`to_display`); only what is drawn saturates, never the
data or a score.
"""

from __future__ import annotations

import base64
import io
import math
import string
from collections.abc import Sequence

import numpy as np

from fedleak.report.views import Card, ImageGrid, ReasonGroup


def _to_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 1:  # a vector: a square when it is one, else a strip
        side = math.isqrt(img.size)
        img = img.reshape(side, side) if side * side == img.size else img.reshape(1, -1)
    elif img.ndim == 3:
        if img.shape[0] == 1:
            img = img[0]
        elif img.shape[0] == 3:
            img = img.transpose(1, 2, 0)
        else:  # other channel counts: their mean
            img = img.mean(0)
    return img


def to_display(img: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """An image (C x H x W, H x W or a vector) as H x W (x 3) on [0, 1] for display: rescaled from the data's
    ``value_range`` (lo -> 0, hi -> 1). Only what is drawn saturates at the range's ends; the data and
    every score stay unclamped."""
    lo, hi = (float(v) for v in value_range)
    out = (_to_hwc(img) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0)


def image_uri(img: np.ndarray | None, value_range: tuple[float, float] = (0.0, 1.0)) -> str:
    """One image as an inline PNG ``data:`` URI ("" for None or an image with NaN values: drawn blank)."""
    if img is None:
        return ""
    arr = np.asarray(img, dtype=np.float32)
    if arr.size == 0 or not np.isfinite(arr).all():
        return ""
    from PIL import Image

    pixels = np.round(255 * to_display(arr, value_range)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def record_values(img: np.ndarray | None, limit: int = 16) -> str:
    """A record's feature values in words ("39, 0.25, ..."), for a sample that is a vector of features (tabular
    data: 1 x 1 x D, or D); "" for an image or a missing sample."""
    if img is None:
        return ""
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 0 or arr.size == 0 or sum(d > 1 for d in arr.shape) != 1 or arr.shape[-1] != arr.size:
        return ""
    flat = arr.reshape(-1)
    text = ", ".join(f"{v:.6g}" for v in flat[:limit])
    return text + (f", ... ({flat.size} features)" if flat.size > limit else "")


def sample_list(numbers: Sequence[int], limit: int = 40) -> str:
    """Sample numbers as "#0, #3-#7, #9" (runs joined), cut after ``limit`` runs with a count of the rest."""
    runs: list[tuple[int, int]] = []
    for n in sorted(int(v) for v in numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    parts = [f"#{a}" if a == b else (f"#{a}, #{b}" if b == a + 1 else f"#{a}–#{b}") for a, b in runs[:limit]]
    if len(runs) > limit:
        rest = sum(b - a + 1 for a, b in runs[limit:])
        parts.append(f"and {rest} more")
    return ", ".join(parts)


def _key(i: int) -> str:
    return string.ascii_lowercase[i] if i < 26 else str(i + 1)


def group_reasons(numbers: Sequence[int], statuses: Sequence[str], reasons: Sequence[str],
                  skip: tuple[str, ...] = ("certified", "")) -> tuple[tuple[ReasonGroup, ...], dict[int, str]]:
    """Group samples by (status, reason), skipping ``skip`` statuses; returns the groups (largest first, false
    certificates always first) and each grouped sample number's key."""
    groups: dict[tuple[str, str], list[int]] = {}
    for n, status, reason in zip(numbers, statuses, reasons):
        if status in skip:
            continue
        groups.setdefault((status, reason or "no reason given"), []).append(int(n))
    order = sorted(groups.items(), key=lambda kv: (kv[0][0] != "false", -len(kv[1]), min(kv[1])))
    out, keys = [], {}
    for i, ((status, reason), members) in enumerate(order):
        key = _key(i)
        out.append(ReasonGroup(key, status, reason, sample_list(members), len(members)))
        keys.update({m: key for m in members})
    return tuple(out), keys


def image_grid(title: str, rows: Sequence[tuple[str, np.ndarray]], statuses: Sequence[str],
               reasons: Sequence[str], captions: Sequence[str], *, batch_size: int | None = None,
               value_range: tuple[float, float] = (0.0, 1.0), max_cards: int = 128, note: str = "",
               label_text: str = "its label (true → rebuilt)") -> ImageGrid:
    """A grid with one card per column of ``rows`` (name, N images each; NaN images blank); column ``c`` is
    sample ``#c``, and columns from ``batch_size`` on are certified samples beyond the batch ("extra").

    ``statuses`` per column: "certified", "false", "uncertified", "missing" (not rebuilt) or "withheld";
    ``reasons`` per column (listed under the grid for every status but "certified"). At most ``max_cards``
    cards are drawn (false certificates and withheld samples first); every reason is listed all the same.
    ``label_text`` says what the captions are ("" when there are none).
    """
    n = len(statuses)
    size = n if batch_size is None else int(batch_size)
    groups, keys = group_reasons(range(n), statuses, reasons)
    order = sorted(range(n), key=lambda c: (statuses[c] not in ("false", "withheld"), c))[:max_cards]
    cards = []
    for c in sorted(order):
        cards.append(Card(f"#{c}" if c < size else f"#{c} extra", tuple(image_uri(images[c], value_range)
                                                                         for _, images in rows),
                          statuses[c], captions[c], keys.get(c, ""),
                          tuple(record_values(images[c]) for _, images in rows)))
    lo, hi = value_range
    text = f"Images are drawn on the data's range [{lo:g}, {hi:g}]"
    if any(any(c.values) for c in cards):
        text += " (a record as a strip of its features; point at it to read their values)"
    if n > len(cards):
        text += f"; {n - len(cards)} of {n} samples not drawn (their reasons are all listed)"
    return ImageGrid(title, tuple(name for name, _ in rows), tuple(cards), groups,
                     text + "." + (f" {note}" if note else ""), label_text)
