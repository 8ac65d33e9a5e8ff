"""Built-in data sets: documented shapes, ranges, classes, balance; IDX reading."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import fedleak
from fedleak.data import builtin
from fedleak.errors import DataError

# name -> (count, C x H x W, classes or number of classes)
EXPECTED = {
    "digits": (1797, (1, 8, 8), 10),
    "fashion-mnist": (10_000, (1, 28, 28), builtin.FASHION_CLASSES),
    "lfw": (400, (1, 25, 25), ("face", "non-face")),
    "lfw-faces": (200, (1, 25, 25), ("original", "mirrored")),
}


def _check_common(data: fedleak.Dataset) -> None:
    assert data.x.dtype == torch.float32 and data.y.dtype == torch.int64
    assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    assert float(data.x.max()) > 0.5  # not accidentally scaled down twice
    assert data.x.ndim == 4 and data.y.shape == (len(data),)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_shapes_classes_and_balance(name: str) -> None:
    count, shape, classes = EXPECTED[name]
    data = fedleak.load_dataset(name)
    _check_common(data)
    assert len(data) == count and data.input_shape == shape
    if isinstance(classes, tuple):
        assert data.classes == classes
    else:
        assert data.num_classes == classes
    counts = torch.bincount(data.y, minlength=data.num_classes)
    assert int(counts.min()) > 0.5 * len(data) / data.num_classes  # every class present, none starved


def test_every_builtin_is_listed_with_a_description() -> None:
    names = fedleak.available_datasets()
    for name in ("digits", "fashion-mnist", "fashion-mnist-train", "lfw", "lfw-faces", "retina", "mni152"):
        assert names[name]


def test_fashion_mnist_train_split() -> None:
    train = fedleak.load_dataset("fashion-mnist-train")
    test = fedleak.load_dataset("fashion-mnist")
    _check_common(train)
    assert len(train) == 60_000 and train.input_shape == (1, 28, 28) and train.classes == test.classes
    assert torch.bincount(train.y).tolist() == [6000] * 10
    # the first training image is an ankle boot (label 9); the splits are different images
    assert int(train.y[0]) == 9 and not torch.equal(train.x[:10], test.x[:10])


def test_builtin_refuses_a_split() -> None:
    with pytest.raises(DataError, match="fixed split"):
        fedleak.load_dataset("fashion-mnist", split="train")


def test_lfw_is_faces_then_non_faces_and_their_mirrors() -> None:
    from skimage.data import lfw_subset

    data = fedleak.load_dataset("lfw")
    raw = torch.from_numpy(lfw_subset().astype(np.float32))
    assert torch.allclose(data.x[:200, 0], raw)
    assert torch.equal(data.x[200:, 0], torch.flip(data.x[:200, 0], dims=[-1]))
    assert data.y[:100].eq(0).all() and data.y[100:200].eq(1).all() and torch.equal(data.y[200:], data.y[:200])
    # 400 distinct images, so the largest batch the product draws (256) never repeats an image
    assert len({bytes(img.numpy().tobytes()) for img in data.x}) == 400
    xb, _ = data.batch(256, seed=3)
    assert len({bytes(img.numpy().tobytes()) for img in xb}) == 256


def test_lfw_faces_are_the_face_half_of_lfw() -> None:
    faces, lfw = fedleak.load_dataset("lfw-faces"), fedleak.load_dataset("lfw")
    assert torch.equal(faces.x[:100], lfw.x[:100]) and torch.equal(faces.x[100:], lfw.x[200:300])
    assert faces.y[:100].eq(0).all() and faces.y[100:].eq(1).all()
    assert len({bytes(img.numpy().tobytes()) for img in faces.x}) == 200


def test_loaders_are_cached() -> None:
    assert fedleak.load_dataset("lfw") is fedleak.load_dataset("lfw")


# --- read_idx ------------------------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    arr = (np.arange(2 * 3 * 4) % 256).astype(np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(arr))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(builtin.read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(builtin.read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x01\x02\x08\x01", "bad magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]), "unknown IDX data type"),
        (bytes([0, 0, 0x08, 3, 0, 0]), "truncated IDX header"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 9, 1, 2, 3]), "promises 9 bytes"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=problem) as info:
        builtin.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((5, 4, 4), np.uint8)))[:-12])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as info:
        builtin.read_idx(path)
    assert str(path) in str(info.value)
