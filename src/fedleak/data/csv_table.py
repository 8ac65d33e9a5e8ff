"""The ``.csv`` (and ``.tsv``) data format: tabular records, one per row, read as N x 1 x 1 x D inputs.

The label column is the one named ``label``, ``labels``, ``target``, ``y``, ``class`` or ``outcome`` (any case) in
the header, else the last column; labels are integers or strings, as in an ``.npz`` file. Every other column is a
numeric feature; a column of text (a category) or an empty cell is refused, naming it, since a model takes numbers
only. Values are kept as they are, and the data's range is where they lie: [0, 1] when every value does, else
the smallest and largest value of the file (metrics measure errors on it).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from fedleak.data.dataset import Dataset
from fedleak.data.files import FormatReader, Split, check_label_array, register_format
from fedleak.data.npz import labels_and_classes
from fedleak.errors import DataError

LABEL_NAMES = ("label", "labels", "target", "y", "class", "outcome")
SUFFIXES = (".csv", ".tsv")


def _detect_csv(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _rows(path: Path) -> list[list[str]]:
    """The file's non-empty rows, split by its delimiter (a tab for ``.tsv``, else what the first lines use)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if path.suffix.lower() == ".csv":
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            pass  # one column, or a layout the sniffer cannot tell: commas
    rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines(), delimiter=delimiter)]
    return [row for row in rows if any(row)]


def _header(rows: list[list[str]]) -> list[str] | None:
    """The first row where it names the columns: a cell that is not a number above one that is, or no number."""
    first = rows[0]
    below = rows[1] if len(rows) > 1 else []
    names = [not _number(c) for c in first]
    if all(names) or any(n and k < len(below) and _number(below[k]) for k, n in enumerate(names)):
        return first
    return None


def _load_csv(path: Path, split: Split | None) -> Dataset:
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path}: holds no rows; a data set needs at least one labelled record")
    header = _header(rows)
    body = rows[1:] if header is not None else rows
    width = len(rows[0])
    if width < 2:
        raise DataError(f"{path}: one column only; a record needs at least one feature and a label column")
    ragged = next((k for k, row in enumerate(body) if len(row) != width), None)
    if ragged is not None:
        line = ragged + 1 + (header is not None)
        raise DataError(f"{path}: line {line} has {len(body[ragged])} cells, the first row {width}")
    if not body:
        raise DataError(f"{path}: holds no records under its header")
    names = header if header is not None else [f"column {k + 1}" for k in range(width)]
    named = [k for k, n in enumerate(names) if header is not None and n.lower() in LABEL_NAMES]
    if len(named) > 1:
        raise DataError(f"{path}: columns {', '.join(repr(names[k]) for k in named)} could each be the labels; "
                        "keep one of them")
    label = named[0] if named else width - 1
    cells = np.array(body, dtype=str)
    features = [k for k in range(width) if k != label]
    x = np.empty((len(body), len(features)), dtype=np.float32)
    for j, k in enumerate(features):
        column = cells[:, k]
        bad = next((r for r, c in enumerate(column) if not (_number(c) and math.isfinite(float(c)))), None)
        if bad is not None:
            what = "is empty" if not column[bad] else f"holds {str(column[bad])!r}"
            raise DataError(f"{path}: {names[k]!r}, line {bad + 1 + (header is not None)}, {what}: every feature "
                            "must be a finite number (encode categories as numbers, one-hot for example, and fill "
                            "or drop missing values before saving)")
        x[:, j] = column.astype(np.float64)
    y = cells[:, label]
    if all(_number(c) for c in y):
        y = y.astype(np.float64)
    labels, classes = labels_and_classes(y, None, path)
    yt = check_label_array(labels, len(x), len(classes), str(path))
    lo, hi = float(x.min()), float(x.max())
    value_range = (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1.0)
    source = f"{path.resolve()} (labels: {names[label]!r})"
    return Dataset(path.stem, torch.from_numpy(x[:, None, None, :].copy()), yt, classes, source=source,
                   value_range=value_range)


register_format(FormatReader("csv", "a .csv/.tsv table: one record per row, numeric features and a label column",
                             _detect_csv, _load_csv))
