"""The ``.npz`` data format: arrays ``x`` (images) and ``y`` (labels), optionally ``classes``, and ``value_range``
(data stored in another range, e.g. already normalised to [-1, 1]) or ``mean``/``std`` (pixels in [0, 1] that the
model sees normalised per channel). Never unpickled: ``np.load(allow_pickle=False)``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fedleak.data.dataset import Dataset, to_nchw_unit
from fedleak.data.files import FormatReader, Split, check_label_array, class_names, register_format
from fedleak.errors import DataError


def _detect_npz(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".npz":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04" and zipfile.is_zipfile(path)
    except OSError:
        return False


def labels_and_classes(y: np.ndarray, classes: np.ndarray | None, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels and class names from ``y`` (ints, integral floats, booleans or strings) and the optional
    ``classes`` array (an ``.npz`` file's; a table's labels come without one)."""
    names = None if classes is None else tuple(str(c) for c in classes.reshape(-1))
    if names is not None and len(set(names)) != len(names):
        raise DataError(f"{path}: 'classes' names a class twice")
    if y.dtype.kind in "US":
        text = y.astype(str)
        if names is None:
            names = tuple(sorted(set(text.tolist())))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(text.tolist()) - set(index))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not in 'classes'")
        return np.array([index[t] for t in text.tolist()], dtype=np.int64), names
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{path}: the labels hold non-integer numbers")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers or strings, got dtype {y.dtype}")
    labels = y.astype(np.int64)
    if names is None:
        names = class_names(labels, str(path))
    return labels, names


def _load_npz(path: Path, split: Split | None) -> Dataset:
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it
        raise DataError(f"{path}: corrupt or truncated .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            missing = {"x", "y"} - keys
            if missing:
                raise DataError(f"{path}: an .npz data set needs arrays 'x' and 'y'; missing "
                                f"{', '.join(sorted(missing))} (has {', '.join(sorted(keys)) or 'nothing'})")
            x, y = archive["x"], archive["y"]
            classes = archive["classes"] if "classes" in keys else None
            extras = {k: archive[k] for k in ("value_range", "mean", "std") if k in keys}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds pickled Python objects, which fedleak does not load; save labels and "
                            "class names as numeric or fixed-width string arrays") from None
        raise DataError(f"{path}: corrupt or truncated .npz ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: corrupt or truncated .npz ({type(exc).__name__}: {exc})") from None
    if y.ndim != 1:
        raise DataError(f"{path}: 'y' must be one-dimensional (N labels), got shape {y.shape}")
    if x.ndim not in (2, 3, 4) or x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: 'x' of shape {x.shape} does not hold one image (or record) per label of 'y' "
                        f"({y.shape[0]})")
    if x.dtype.kind not in "uif":
        raise DataError(f"{path}: 'x' must hold numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        x = _records(path, x, extras)
    labels, names = labels_and_classes(y, classes, path)
    yt = check_label_array(labels, x.shape[0], len(names), str(path))
    return _npz_dataset(path, x, yt, names, extras)


def _records(path: Path, x: np.ndarray, extras: dict[str, np.ndarray]) -> np.ndarray:
    """N records of D features (tabular data) as N x 1 x 1 x D float32 images, their values as they are (no
    8-bit scaling: a feature is not a pixel); outside [0, 1] the file states the range they lie in."""
    records = np.asarray(x, dtype=np.float32)[:, None, None, :]
    if "value_range" not in extras and "mean" not in extras and np.isfinite(records).all():
        lo, hi = float(records.min()), float(records.max())
        if lo < 0 or hi > 1:
            raise DataError(f"{path}: records (N x D) with values in [{lo:g}, {hi:g}] need the range they lie in: "
                            "store 'value_range' (low, high) in the file, or scale them to [0, 1]")
    return records


def _npz_dataset(path: Path, x: np.ndarray, y: torch.Tensor, names: tuple[str, ...],
                 extras: dict[str, np.ndarray]) -> Dataset:
    """Pixels as they are stored: in [0, 1] (or 8-bit) by default; in ``value_range`` when the file gives one
    (e.g. data already normalised to [-1, 1]); normalised per channel by ``mean``/``std`` when it gives those."""
    if "value_range" in extras and ("mean" in extras or "std" in extras):
        raise DataError(f"{path}: give either 'value_range' (data stored in that range) or 'mean' and 'std' "
                        "(pixels in [0, 1] that the model sees normalised), not both")
    if ("mean" in extras) != ("std" in extras):
        raise DataError(f"{path}: 'mean' and 'std' come together (one value per channel each)")
    if "value_range" in extras:
        bounds = np.asarray(extras["value_range"], dtype=np.float64).reshape(-1)
        if bounds.shape != (2,):
            raise DataError(f"{path}: 'value_range' must hold two numbers (low, high), got shape {bounds.shape}")
        images = np.asarray(x, dtype=np.float32)
        images = images[:, None] if images.ndim == 3 else images
        if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            images = images.transpose(0, 3, 1, 2)
        return Dataset(path.stem, torch.from_numpy(np.ascontiguousarray(images)), y, names,
                       source=str(path.resolve()), value_range=(float(bounds[0]), float(bounds[1])))
    data = Dataset(path.stem, to_nchw_unit(x, str(path)), y, names, source=str(path.resolve()))
    if "mean" in extras:
        return data.normalized(np.asarray(extras["mean"], dtype=np.float64).reshape(-1).tolist(),
                               np.asarray(extras["std"], dtype=np.float64).reshape(-1).tolist())
    return data


register_format(FormatReader("npz", "a .npz file with arrays x (images) and y (labels), optionally classes",
                             _detect_npz, _load_npz))
