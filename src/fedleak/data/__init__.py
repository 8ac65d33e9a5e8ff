"""Data: built-in sets from installed packages and the user's own files, all as :class:`Dataset`."""

from fedleak.data import builtin as _builtin  # noqa: F401  (registers the built-in sets)
from fedleak.data import medical as _medical  # noqa: F401  (registers retina and mni152)
from fedleak.data import npz as _npz  # noqa: F401  (registers the .npz format)
from fedleak.data.dataset import Dataset
from fedleak.data.normalization import Normalization, normalization
from fedleak.data.files import FormatReader, available_formats, load_path, register_format
from fedleak.data.registry import available_datasets, load_dataset, register_dataset

__all__ = ["Dataset", "Normalization", "normalization", "FormatReader", "available_datasets", "available_formats", "load_dataset", "load_path",
           "register_dataset", "register_format"]
