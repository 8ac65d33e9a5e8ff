"""What the user-data-file tests (``tests/data/test_file_*.py``) share: writers of real images into each file
format (image folders, CIFAR python batches, IDX files), their pixels as uint8, and the check that loading a path
fails with a :class:`fedleak.errors.DataError` naming the problem. The real images are fixtures
(``tests/data/conftest.py``)."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedleak
from fedleak.errors import DataError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.mul(255).round().to(torch.uint8).numpy()


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, suffix: str = ".png") -> None:
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.transpose(1, 2, 0) if img.ndim == 3 else img
        Image.fromarray(arr).save(folder / f"{k:04d}{suffix}")


def cifar_batch(images: np.ndarray, labels: np.ndarray, name: str, *, byte_keys: bool) -> dict[object, object]:
    batch = {
        "batch_label": f"{name} of 2".encode(),
        "labels": [int(v) for v in labels],
        "data": images.reshape(len(images), -1),  # N x 3072, channel-major rows like CIFAR's
        "filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return {k.encode(): v for k, v in batch.items()} if byte_keys else batch


def write_cifar10(root: Path, x: np.ndarray, y: np.ndarray, *, byte_keys: bool = True, protocol: int = 2) -> None:
    root.mkdir()
    parts = {"data_batch_1": slice(0, 20), "data_batch_2": slice(20, 40), "test_batch": slice(40, 60)}
    for name, sl in parts.items():
        with open(root / name, "wb") as fh:
            pickle.dump(cifar_batch(x[sl], y[sl], name, byte_keys=byte_keys), fh, protocol=protocol)
    meta = {b"label_names": [b"background", b"vessel"], b"num_cases_per_batch": 20, b"num_vis": 3072}
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()


def write_idx(root: Path, prefix: str, x: np.ndarray, y: np.ndarray, gz: bool) -> None:
    root.mkdir(exist_ok=True)
    for what, dims, arr in (("images", "idx3", x), ("labels", "idx1", y.astype(np.uint8))):
        name = root / f"{prefix}-{what}-{dims}-ubyte{'.gz' if gz else ''}"
        name.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))


def raises_data_error(path: Path, problem: str, **kwargs: object) -> DataError:
    with pytest.raises(DataError, match=problem) as info:
        fedleak.load_dataset(path, **kwargs)  # type: ignore[arg-type]
    return info.value
