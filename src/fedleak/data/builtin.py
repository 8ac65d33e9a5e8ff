"""Built-in data sets that ship with installed packages (nothing downloads)."""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedleak.data.dataset import Dataset, to_nchw_unit
from fedleak.data.registry import register_dataset
from fedleak.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@register_dataset("digits", "scikit-learn's 1,797 handwritten digits, 8x8 grey (the embedded default)")
@lru_cache(maxsize=1)
def digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    return Dataset("digits", x, torch.from_numpy(d.target.astype(np.int64)), tuple(str(i) for i in range(10)),
                   source="sklearn.datasets.load_digits")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if type_code not in dtypes:
        raise DataError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data, file holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


@register_dataset("fashion-mnist", "Fashion-MNIST test split, 10,000 28x28 grey images (Debian dataset-fashion-mnist)")
@lru_cache(maxsize=1)
def fashion_mnist() -> Dataset:
    images = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise DataError(
            f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}; install Debian's package with "
            "'apt-get install dataset-fashion-mnist' (make setup does this)"
        )
    x = to_nchw_unit(read_idx(images), "fashion-mnist")
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return Dataset("fashion-mnist", x, y, FASHION_CLASSES, source=str(FASHION_MNIST_DIR))
