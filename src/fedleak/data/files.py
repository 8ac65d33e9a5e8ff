"""The user's own data: a registry of file-format readers behind :func:`load_path`.

Formats (tried in registration order; the first whose ``detect`` accepts the path loads it):

* ``cifar``: a CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``,
  ``test``, ``meta``) python-batch folder, read with a restricted unpickler;
* ``idx``: an MNIST-style folder of IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte`` ...);
* ``npz``: a numpy ``.npz`` file (:mod:`fedleak.data.npz`);
* ``csv``: a ``.csv``/``.tsv`` table of records (:mod:`fedleak.data.csv_table`);
* ``image-folder``: a folder with one sub-folder of images per class.

A data folder that holds ``normalization.json`` (``{"mean": [...], "std": [...]}``) is normalised as its model sees
it (:func:`fedleak.data.normalize.folder_normalization`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedleak.data.dataset import Dataset, to_nchw_unit
from fedleak.data.idx import read_idx
from fedleak.data.normalize import NORMALIZATION_FILE, folder_normalization
from fedleak.data.safe_pickle import load_restricted
from fedleak.errors import DataError
from fedleak.registry import Registry
from fedleak.validation import check_labels

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class FormatReader:
    """One user-data format: ``detect(path)`` says whether it is this format, ``load(path, split)`` reads it.

    ``split`` is ``None`` unless the user asked for one; only readers with ``has_splits`` accept it.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, Split | None], Dataset]
    has_splits: bool = False


_READERS: Registry[FormatReader] = Registry("data format")


def register_format(reader: FormatReader) -> FormatReader:
    """Add a reader; readers are tried in the order they were registered (a name is registered once)."""
    return _READERS.register(reader.name, reader)


def available_formats() -> dict[str, str]:
    """Names and descriptions of the user-data formats, in the order they are tried."""
    return {name: reader.description for name, reader in _READERS.items()}


def load_path(path: str | os.PathLike[str], split: str | None = None) -> Dataset:
    """The user's data at ``path`` as a :class:`Dataset`, in any registered format.

    ``split`` (``"train"`` or ``"test"``) picks a split of a CIFAR or IDX folder; by default the test split
    is loaded when the folder has one, the train split otherwise.
    """
    path = Path(path).expanduser()
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    readers = [reader for _, reader in _READERS.items()]
    for reader in readers:
        if reader.detect(path):
            if split is not None and not reader.has_splits:
                raise DataError(f"{path} is {reader.description}, which has no train/test splits; drop split=")
            data = reader.load(path, split)  # type: ignore[arg-type]
            stated = folder_normalization(path)  # a folder's normalization.json: how its model sees the images
            if stated is None:
                return data
            try:
                return data.normalized(*stated)  # type: ignore[arg-type]
            except DataError as exc:
                raise DataError(f"{path / NORMALIZATION_FILE}: {exc}") from None
    formats = "; ".join(f"{r.name}: {r.description}" for r in readers)
    raise DataError(f"cannot tell the format of {path}; fedleak reads {formats}")


def _visible(entries: Sequence[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def check_label_array(labels: np.ndarray, num_images: int, num_classes: int, where: str) -> torch.Tensor:
    """The labels of ``num_images`` images (at least one) as an int64 tensor, each in ``0..num_classes-1``."""
    if num_images == 0:
        raise DataError(f"{where}: holds no images; a data set needs at least one labelled image")
    checked = check_labels(labels, num_classes, name=f"{where}: labels", error=DataError)
    if checked.shape[0] != num_images:
        raise DataError(f"{where}: {num_images} images but {checked.shape[0]} labels (counts must match)")
    return torch.from_numpy(checked)


def class_names(labels: np.ndarray, where: str, at_least: int = 1) -> tuple[str, ...]:
    """Names ``"0", "1", ...`` for labels without a class list: ``max(at_least, max label + 1)`` of them.

    The labels are checked first, so an absurd label value is refused instead of naming that many classes.
    """
    checked = check_labels(labels, name=f"{where}: labels", error=DataError)
    count = int(checked.max()) + 1 if checked.size else 0
    return tuple(str(i) for i in range(max(at_least, count)))


def _default_split(available: dict[str, bool], path: Path, split: Split | None) -> Split:
    """The asked-for split if present, else test if present, else train."""
    if split is not None:
        if not available[split]:
            raise DataError(f"{path} has no {split} split")
        return split
    for candidate in ("test", "train"):
        if available[candidate]:
            return candidate  # type: ignore[return-value]
    raise DataError(f"{path} holds neither a train nor a test split")


# --- CIFAR python batches -----------------------------------------------------------------------------------------

_CIFAR10_TRAIN = re.compile(r"data_batch_(\d+)")


def _cifar_files(path: Path) -> dict[str, list[Path]]:
    names = {p.name: p for p in path.iterdir()} if path.is_dir() else {}
    train = sorted((p for n, p in names.items() if _CIFAR10_TRAIN.fullmatch(n)),
                   key=lambda p: int(_CIFAR10_TRAIN.fullmatch(p.name).group(1)))  # type: ignore[union-attr]
    if train or "test_batch" in names or "batches.meta" in names:
        return {"train": train, "test": [names["test_batch"]] if "test_batch" in names else [],
                "meta": [names["batches.meta"]] if "batches.meta" in names else []}
    if "meta" in names and ("train" in names or "test" in names):  # CIFAR-100
        return {"train": [names["train"]] if "train" in names else [],
                "test": [names["test"]] if "test" in names else [], "meta": [names["meta"]]}
    return {}


def _detect_cifar(path: Path) -> bool:
    return bool(_cifar_files(path))


def _str_key_dict(obj: object, where: Path) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict (CIFAR batch layout), got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_key_dict(load_restricted(path), path)
    if "data" not in batch:
        raise DataError(f"{path}: CIFAR batch has no 'data' entry (keys: {', '.join(sorted(batch))})")
    label_key = next((k for k in ("labels", "fine_labels") if k in batch), None)
    if label_key is None:
        raise DataError(f"{path}: CIFAR batch has no 'labels' (or 'fine_labels') entry")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a 2-D uint8 array (N x 3*H*W)")
    side = int(round(np.sqrt(data.shape[1] / 3)))
    if 3 * side * side != data.shape[1] or side == 0:
        raise DataError(f"{path}: rows of 'data' hold {data.shape[1]} values, not 3 x H x H for a square image")
    try:
        labels = np.asarray(batch[label_key])
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{label_key}' must be a list of integers") from None
    if labels.size == 0:
        labels = labels.astype(np.int64)  # numpy reads an empty list as floats
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels (counts must match)")
    return data.reshape(-1, 3, side, side), labels


def _load_cifar(path: Path, split: Split | None) -> Dataset:
    files = _cifar_files(path)
    chosen = _default_split({"train": bool(files["train"]), "test": bool(files["test"])}, path, split)
    parts = [_read_cifar_batch(p) for p in files[chosen]]
    if len({p[0].shape[1:] for p in parts}) != 1:
        raise DataError(f"{path}: the {chosen} batches hold images of different sizes")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    classes: tuple[str, ...]
    if files["meta"]:
        meta = _str_key_dict(load_restricted(files["meta"][0]), files["meta"][0])
        names = meta.get("label_names", meta.get("fine_label_names"))
        if not isinstance(names, list) or not names:
            raise DataError(f"{files['meta'][0]}: no 'label_names' (or 'fine_label_names') list")
        classes = tuple(_text(n) for n in names)
    else:
        classes = class_names(labels, str(path), at_least=10)
    y = check_label_array(labels, len(images), len(classes), str(path))
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return Dataset(f"{path.name}:{chosen}", x, y, classes, source=str(path.resolve()))


register_format(FormatReader(
    "cifar", "a CIFAR-10/100 python-batch folder (data_batch_1..5 + test_batch + batches.meta, or train/test/meta)",
    _detect_cifar, _load_cifar, has_splits=True,
))


# --- MNIST-style IDX folder --------------------------------------------------------------------------------------

_IDX_PREFIX = {"train": ("train",), "test": ("t10k", "test")}


def _idx_file(path: Path, split: str, kind: str) -> Path | None:
    """The images (``idx3``) or labels (``idx1``) file of a split, e.g. ``t10k-labels-idx1-ubyte.gz``."""
    what, dims = ("images", "idx3") if kind == "images" else ("labels", "idx1")
    for prefix in _IDX_PREFIX[split]:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                candidate = path / f"{prefix}-{what}{sep}{dims}-ubyte{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _detect_idx(path: Path) -> bool:
    return path.is_dir() and any(_idx_file(path, s, k) for s in SPLITS for k in ("images", "labels"))


def _load_idx(path: Path, split: Split | None) -> Dataset:
    available = {s: _idx_file(path, s, "images") is not None or _idx_file(path, s, "labels") is not None
                 for s in SPLITS}
    chosen = _default_split(available, path, split)
    images_file, labels_file = _idx_file(path, chosen, "images"), _idx_file(path, chosen, "labels")
    if images_file is None or labels_file is None:
        missing = "images (*-images-idx3-ubyte[.gz])" if images_file is None else "labels (*-labels-idx1-ubyte[.gz])"
        raise DataError(f"{path}: the {chosen} split has no {missing} file")
    images = read_idx(images_file)
    labels = read_idx(labels_file)
    if images.ndim not in (3, 4):
        raise DataError(f"{images_file}: images must be N x H x W (or N x H x W x C), got shape {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_file}: labels must be a one-dimensional integer IDX file, got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{path}: {images_file.name} holds {images.shape[0]} images but {labels_file.name} "
                        f"holds {labels.shape[0]} labels (counts must match)")
    classes_file = path / "classes.txt"
    if classes_file.is_file():
        classes = tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())
    else:
        classes = class_names(labels, str(labels_file), at_least=10)
    y = check_label_array(labels, images.shape[0], len(classes), str(labels_file))
    return Dataset(f"{path.name}:{chosen}", to_nchw_unit(images, str(images_file)), y, classes,
                   source=str(path.resolve()))


register_format(FormatReader(
    "idx", "an MNIST-style IDX folder (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)",
    _detect_idx, _load_idx, has_splits=True,
))


# --- image folder ------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pbm", ".pnm"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _detect_image_folder(path: Path) -> bool:
    return path.is_dir()  # the catch-all for folders: its loader explains what a folder must hold


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """One image as float32 H x W (grey) or H x W x 3 (colour) in [0, 1], and whether it is colour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _GREY_MODES:
                if mode in ("1", "LA", "La"):
                    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, False
                arr = np.asarray(img)
                if mode == "L":
                    return arr.astype(np.float32) / 255.0, False
                if mode == "F":
                    out = arr.astype(np.float32)
                    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
                        raise DataError(f"{path}: floating-point image values must lie in [0, 1]")
                    return out, False
                if arr.min() < 0 or arr.max() > 65535:
                    raise DataError(f"{path}: integer image values outside 0..65535")
                return arr.astype(np.float32) / 65535.0, False  # 16-bit grey
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, True
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None


def _load_image_folder(path: Path, split: Split | None) -> Dataset:
    entries = _visible(list(path.iterdir()))
    class_dirs = [p for p in entries if p.is_dir()]
    if not class_dirs:
        what = "is empty" if not entries else "has no sub-folders"
        raise DataError(f"{path} {what}; an image folder needs one sub-folder of images per class "
                        "(or give an .npz file, a CIFAR or an IDX folder)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    colour = False
    first: tuple[Path, tuple[int, int]] | None = None
    for label, class_dir in enumerate(class_dirs):
        files = [p for p in _visible(list(class_dir.iterdir())) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{class_dir}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            arr, is_colour = _read_image(file)
            size = arr.shape[:2]
            if first is None:
                first = (file, size)
            elif size != first[1]:
                raise DataError(f"{file} is {size[1]}x{size[0]} (width x height) but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}; all images must have the same size")
            colour |= is_colour
            images.append(arr)
            labels.append(label)
    if colour:
        images = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in images]
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    else:
        x = torch.from_numpy(np.stack(images)[:, None].copy())
    y = torch.tensor(labels, dtype=torch.int64)
    return Dataset(path.name, x, y, tuple(d.name for d in class_dirs), source=str(path.resolve()))


register_format(FormatReader("image-folder", "a folder with one sub-folder of images (PNG, JPEG, BMP, ...) per class",
                             _detect_image_folder, _load_image_folder))
