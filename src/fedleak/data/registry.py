"""Built-in data sets by name, and user data by path.

The built-in sets are listed in :data:`DATASET_CATALOG` (name, description, implementing module), so
:func:`available_datasets` imports neither torch nor any loader; :func:`load_dataset` imports a set's module when
the set is first loaded, and the module's ``@register_dataset(name, description)`` must repeat the catalog's
description (a mismatch raises :class:`RuntimeError` on import; ``tests/test_registry.py`` checks every module).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedleak.errors import DataError
from fedleak.registry import CatalogEntry, LazyRegistry

if TYPE_CHECKING:
    from fedleak.data.dataset import Dataset

_BUILTIN_MODULE = "fedleak.data.builtin"
_MEDICAL_MODULE = "fedleak.data.medical"

DATASET_CATALOG: tuple[CatalogEntry[str], ...] = (
    CatalogEntry("digits", _BUILTIN_MODULE,
                 "scikit-learn's 1,797 handwritten digits, 8x8 grey (the embedded default)"),
    CatalogEntry("fashion-mnist", _BUILTIN_MODULE,
                 "Fashion-MNIST test split, 10,000 28x28 grey images (Debian dataset-fashion-mnist)"),
    CatalogEntry("fashion-mnist-train", _BUILTIN_MODULE,
                 "Fashion-MNIST train split, 60,000 28x28 grey images (Debian dataset-fashion-mnist)"),
    CatalogEntry("lfw", _BUILTIN_MODULE,
                 "400 25x25 grey crops: 100 LFW faces + 100 non-faces (scikit-image) and their mirror images; "
                 "labels face / non-face"),
    CatalogEntry("lfw-faces", _BUILTIN_MODULE,
                 "200 25x25 grey LFW face crops: scikit-image's 100 faces and their mirror images; "
                 "labels original / mirrored"),
    CatalogEntry("retina", _MEDICAL_MODULE,
                 "32x32 RGB patches of scikit-image's retina photograph inside the fundus disc, "
                 "labelled background / vessel (Sato vesselness)"),
    CatalogEntry("mni152", _MEDICAL_MODULE,
                 "32x32 grey brain-MRI slices of nilearn's MNI152 template, labelled axial / coronal / "
                 "sagittal (needs fedleak[medical])"),
)


@dataclass(frozen=True)
class DatasetLoader:
    """A registered data set: the function that loads it and its one-line description."""

    load: Callable[[], Dataset]
    description: str


_BUILTIN: LazyRegistry[DatasetLoader, str] = LazyRegistry("data set", DATASET_CATALOG,
                                                          describe=lambda entry: entry.description)


def register_dataset(name: str, description: str) -> Callable[[Callable[[], Dataset]], Callable[[], Dataset]]:
    """Decorator that makes the loader ``fn()`` the built-in data set ``name`` (a name is registered once)."""
    return _BUILTIN.decorator(name, lambda fn: DatasetLoader(fn, description))


def available_datasets() -> dict[str, str]:
    """Built-in data set names and one-line descriptions (imports no data set module)."""
    return dict(sorted(_BUILTIN.descriptions()))


def load_dataset(name_or_path: str | os.PathLike[str], *, split: str | None = None) -> Dataset:
    """A built-in data set by name (see :func:`available_datasets`), or the user's data at a path.

    Paths may be an ``.npz`` file (``x``, ``y``), a ``.csv``/``.tsv`` table, an image folder with one sub-folder
    per class, a CIFAR-10/100 python-batch folder, or an MNIST-style IDX folder (see :mod:`fedleak.data.files`).
    ``split`` (``"train"`` or ``"test"``) picks the split of a CIFAR or IDX folder; built-in sets have
    fixed splits and take none (Fashion-MNIST's train split is the built-in ``fashion-mnist-train``).
    """
    key = str(name_or_path)
    if key in _BUILTIN:
        if split is not None:
            raise DataError(f"built-in data set '{key}' has a fixed split; drop split= (names like "
                            "'fashion-mnist-train' select other splits)")
        return _BUILTIN.get(key, DataError).load()
    path = Path(key).expanduser()
    if not path.exists():
        raise DataError(
            f"'{key}' is neither a built-in data set ({', '.join(_BUILTIN.names())}) nor an existing path"
        )
    from fedleak.data import load_path  # the file formats, the .npz reader registered

    return load_path(path, split=split)


def dataset_loaders() -> dict[str, DatasetLoader]:
    """Every registered data set's loader and description by name (imports every built-in data set module)."""
    return dict(_BUILTIN.items())
