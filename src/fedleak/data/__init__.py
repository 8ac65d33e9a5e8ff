"""Data: built-in sets from installed packages and the user's own files, all as :class:`Dataset`."""

from fedleak.data import builtin as _builtin  # noqa: F401  (registers the built-in sets)
from fedleak.data.dataset import Dataset
from fedleak.data.registry import available_datasets, load_dataset, register_dataset

__all__ = ["Dataset", "available_datasets", "load_dataset", "register_dataset"]
