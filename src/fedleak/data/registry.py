"""Built-in data sets by name, and user data by path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fedleak.data.dataset import Dataset
from fedleak.data.files import load_path
from fedleak.errors import DataError
from fedleak.registry import Registry

_BUILTIN: Registry[tuple[Callable[[], Dataset], str]] = Registry("data set")


def register_dataset(name: str, description: str) -> Callable[[Callable[[], Dataset]], Callable[[], Dataset]]:
    """Decorator that makes the loader ``fn()`` the built-in data set ``name`` (a name is registered once)."""
    return _BUILTIN.decorator(name, lambda fn: (fn, description))


def available_datasets() -> dict[str, str]:
    """Built-in data set names and one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_BUILTIN.items())}


def load_dataset(name_or_path: str | os.PathLike[str], *, split: str | None = None) -> Dataset:
    """A built-in data set by name (see :func:`available_datasets`), or the user's data at a path.

    Paths may be an ``.npz`` file (``x``, ``y``), an image folder with one sub-folder per class, a
    CIFAR-10/100 python-batch folder, or an MNIST-style IDX folder (see :mod:`fedleak.data.files`).
    ``split`` (``"train"`` or ``"test"``) picks the split of a CIFAR or IDX folder; built-in sets have
    fixed splits and take none (Fashion-MNIST's train split is the built-in ``fashion-mnist-train``).
    """
    key = str(name_or_path)
    if key in _BUILTIN:
        if split is not None:
            raise DataError(f"built-in data set '{key}' has a fixed split; drop split= (names like "
                            "'fashion-mnist-train' select other splits)")
        return _BUILTIN.get(key, DataError)[0]()
    path = Path(key).expanduser()
    if not path.exists():
        raise DataError(
            f"'{key}' is neither a built-in data set ({', '.join(_BUILTIN.names())}) nor an existing path"
        )
    return load_path(path, split=split)
