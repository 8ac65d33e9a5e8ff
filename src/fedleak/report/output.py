"""Writing run outputs safely: atomic files and the provenance every results file records."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedleak.errors import FedleakError

_PACKAGES = ("fedleak", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "highspy", "ortools", "flwr")


def environment_info() -> dict[str, Any]:
    """Versions of Python, the platform and the packages that shape results."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``.

    A failure leaves any previous file untouched and no partial file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    return write_atomic(path, json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")


def prepare_output_dir(out: str | os.PathLike[str]) -> Path:
    """Create the output folder (and parents); refuse a path that is a file."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise FedleakError(f"output path {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedleakError(f"cannot create output folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise FedleakError(f"output folder {path} is not writable")
    return path
