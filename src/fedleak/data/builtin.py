"""Built-in data sets that ship with installed packages (nothing downloads).

Every loader is cached, so a data set is read once per process. Medical sets live in
:mod:`fedleak.data.medical`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedleak.data.dataset import Dataset, to_nchw_unit
from fedleak.data.idx import read_idx
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


def _uint8_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W -> float32 N x 1 x H x W in [0, 1] (same values as :func:`to_nchw_unit`, less memory)."""
    writable = images if images.flags.writeable else images.copy()  # read_idx's arrays view immutable bytes
    return torch.from_numpy(np.ascontiguousarray(writable))[:, None].to(torch.float32).div_(255.0)


def _fashion(split: str) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise DataError(
            f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}; install Debian's package with "
            "'apt-get install dataset-fashion-mnist' (make setup does this)"
        )
    raw = read_idx(images)
    x = _uint8_to_unit(raw) if raw.dtype == np.uint8 and raw.ndim == 3 else to_nchw_unit(raw, str(images))
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    name = "fashion-mnist" if split == "test" else "fashion-mnist-train"
    return Dataset(name, x, y, FASHION_CLASSES, source=str(FASHION_MNIST_DIR))


@register_dataset("fashion-mnist", "Fashion-MNIST test split, 10,000 28x28 grey images (Debian dataset-fashion-mnist)")
@lru_cache(maxsize=1)
def fashion_mnist() -> Dataset:
    return _fashion("test")


@register_dataset("fashion-mnist-train",
                  "Fashion-MNIST train split, 60,000 28x28 grey images (Debian dataset-fashion-mnist)")
@lru_cache(maxsize=1)
def fashion_mnist_train() -> Dataset:
    return _fashion("train")


# --- faces -----------------------------------------------------------------------------------------------------

LFW_FACES = 100  # skimage.data.lfw_subset(): the first 100 of its 200 images are faces, the rest are not


@lru_cache(maxsize=1)
def _lfw_subset() -> np.ndarray:
    """skimage's 200 x 25 x 25 LFW subset (ships with scikit-image; no download), as float32 in [0, 1]."""
    from skimage import data as skdata

    try:
        images = np.asarray(skdata.lfw_subset(), dtype=np.float32)
    except Exception as exc:  # a broken or stripped scikit-image install
        raise DataError(f"cannot read scikit-image's lfw_subset(): {exc}") from None
    if images.shape != (200, 25, 25):
        raise DataError(f"scikit-image's lfw_subset() has shape {images.shape}, expected (200, 25, 25)")
    return np.clip(images, 0.0, 1.0)


def _with_mirrors(images: np.ndarray) -> np.ndarray:
    """The images followed by their left-right mirror images (same order)."""
    return np.concatenate([images, images[:, :, ::-1]])


@register_dataset("lfw", "400 25x25 grey crops: 100 LFW faces + 100 non-faces (scikit-image) and their mirror images; "
                         "labels face / non-face")
@lru_cache(maxsize=1)
def lfw() -> Dataset:
    base = _lfw_subset()
    x = torch.from_numpy(np.ascontiguousarray(_with_mirrors(base)))[:, None]
    label = np.r_[np.zeros(LFW_FACES), np.ones(len(base) - LFW_FACES)].astype(np.int64)
    y = torch.from_numpy(np.concatenate([label, label]))
    return Dataset("lfw", x, y, ("face", "non-face"), source="skimage.data.lfw_subset (+ horizontal mirrors)")


@register_dataset("lfw-faces", "200 25x25 grey LFW face crops: scikit-image's 100 faces and their mirror images; "
                               "labels original / mirrored")
@lru_cache(maxsize=1)
def lfw_faces() -> Dataset:
    faces = _lfw_subset()[:LFW_FACES]
    x = torch.from_numpy(np.ascontiguousarray(_with_mirrors(faces)))[:, None]
    y = torch.from_numpy(np.repeat(np.arange(2, dtype=np.int64), LFW_FACES))
    return Dataset("lfw-faces", x, y, ("original", "mirrored"),
                   source="skimage.data.lfw_subset[:100] (+ horizontal mirrors)")
