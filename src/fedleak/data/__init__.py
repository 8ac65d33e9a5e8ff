"""Data: built-in sets from installed packages and the user's own files, all as :class:`Dataset`.

Importing this package is cheap (no torch): the built-in sets are listed in
:data:`fedleak.data.registry.DATASET_CATALOG` and loaded on first use, and the names below are imported when
first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedleak.data.registry import DatasetLoader, available_datasets, load_dataset, register_dataset
from fedleak.lazy import lazy_attributes

if TYPE_CHECKING:
    from fedleak.data.dataset import Dataset
    from fedleak.data.files import FormatReader, available_formats, load_path, register_format
    from fedleak.data.normalize import Normalization, normalization

__all__ = ["Dataset", "DatasetLoader", "Normalization", "normalization", "FormatReader", "available_datasets",
           "available_formats", "load_dataset", "load_path", "register_dataset", "register_format"]

_FILES = "fedleak.data.files"
_LAZY = {
    "Dataset": "fedleak.data.dataset",
    "Normalization": "fedleak.data.normalize",
    "normalization": "fedleak.data.normalize",
    "FormatReader": _FILES,
    "available_formats": _FILES,
    "load_path": _FILES,
    "register_format": _FILES,
}


def _register_formats(module: str) -> None:
    if module == _FILES:  # registers the .npz and .csv formats next to the built-in ones
        importlib.import_module("fedleak.data.npz")
        importlib.import_module("fedleak.data.csv_table")


__getattr__ = lazy_attributes("fedleak.data", _LAZY, globals(), before=_register_formats)
