"""Writing run outputs safely: atomic files and the provenance every results file records."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedleak.errors import OutputError
from fedleak.validation import check_output_dir, check_output_file, existing_ancestor

_PACKAGES = ("fedleak", "torch", "numpy", "scipy", "scikit-learn", "scikit-image", "highspy", "ortools", "flwr",
             "opacus")


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


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    An unusable path (a folder, a missing or read-only parent) raises :class:`OutputError` before anything is
    written; a failed write leaves any previous file untouched and no partial file behind.
    """
    path = check_output_file(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    return write_atomic(path, json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")


def prepare_output_dir(out: str | os.PathLike[str]) -> Path:
    """Create the output folder (and parents); refuse a path that is a file."""
    path = check_output_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"output folder {path} is not writable")
    return path


@contextmanager
def staged_output(out: str | os.PathLike[str], names: Sequence[str]) -> Iterator[Path]:
    """Write a run's output files all-or-nothing.

    Yields a hidden staging folder next to ``out`` for the files ``names``. When the block succeeds, every
    file is moved into ``out`` (created only then); when it fails, the staging folder is removed and ``out``
    is left as it was: no half-written set of outputs, no empty output folder. ``out`` and the targets are
    checked before and after the block (a file where the folder goes, a folder where a file goes).
    """
    target = check_output_dir(out, names)
    base = existing_ancestor(target)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name or 'out'}.staging-", dir=base))
    except OSError as exc:
        raise OutputError(f"cannot write into {base}: {exc.strerror or exc}") from None
    try:
        yield stage
        missing = [name for name in names if not (stage / name).is_file()]
        if missing:
            raise OutputError(f"the run did not produce {', '.join(missing)}; nothing was written to {target}")
        _commit(stage, check_output_dir(target, names), names)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, target: Path, names: Sequence[str]) -> None:
    """Move the staged files into ``target``, keeping the previous ones aside until all are in place.

    If a move fails, the new files are removed, the previous ones put back, and a folder made for them removed.
    """
    created = not target.exists()
    previous = stage / ".previous"
    kept: list[str] = []
    moved: list[str] = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        previous.mkdir()
        for name in names:
            if (target / name).exists():
                os.replace(target / name, previous / name)
                kept.append(name)
        for name in names:
            os.replace(stage / name, target / name)
            moved.append(name)
    except OSError as exc:
        for name in moved:
            (target / name).unlink(missing_ok=True)
        for name in kept:
            os.replace(previous / name, target / name)
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise OutputError(f"cannot write the outputs into {target}: {exc.strerror or exc}") from None


RESULTS_AND_REPORT = ("results.json", "report.html")


def write_results_and_report(out: str | os.PathLike[str], payload: dict[str, Any], page: str) -> tuple[Path, Path]:
    """Write ``results.json`` (``payload``) and ``report.html`` (``page``, rendered already) into ``out``,
    all-or-nothing (:func:`staged_output`); returns their paths."""
    with staged_output(out, RESULTS_AND_REPORT) as stage:
        write_atomic(stage / "report.html", page)
        write_json(stage / "results.json", payload)
    folder = Path(out)
    return folder / "results.json", folder / "report.html"
