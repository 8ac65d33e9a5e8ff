"""User data formats: round trips of real images through every format (npz, image folder, CIFAR python
batches, IDX folders), and N x D records read as they are."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import to_uint8, write_cifar10, write_idx, write_image_folder

import fedleak
from fedleak.data import available_formats, load_path
from fedleak.errors import DataError


def test_formats_are_registered_in_order() -> None:
    assert list(available_formats()) == ["cifar", "idx", "image-folder", "npz", "csv"]


# --- npz -----------------------------------------------------------------------------------------------------

def test_npz_uint8_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    np.savez(tmp_path / "fashion.npz", x=x, y=y)
    data = fedleak.load_dataset(tmp_path / "fashion.npz")
    assert data.name == "fashion" and data.input_shape == (1, 28, 28) and len(data) == 120
    assert np.array_equal(to_uint8(data.x[:, 0]), x)
    assert np.array_equal(data.y.numpy(), y) and data.classes == tuple(str(i) for i in range(10))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_float_colour_layouts(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray], layout: str) -> None:
    x, y = retina_small
    xf = x.astype(np.float32) / 255.0
    np.savez(tmp_path / "r.npz", x=xf.transpose(0, 2, 3, 1) if layout == "nhwc" else xf, y=y)
    data = load_path(tmp_path / "r.npz")
    assert data.input_shape == (3, 32, 32)
    assert torch.equal(data.x, torch.from_numpy(xf))


def test_npz_string_labels_and_classes(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    names = np.array(["top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"])
    np.savez(tmp_path / "s.npz", x=x, y=names[y])  # strings only: classes are the sorted names
    data = load_path(tmp_path / "s.npz")
    assert data.classes == tuple(sorted(names.tolist()))
    assert [data.classes[i] for i in data.y.tolist()] == names[y].tolist()
    np.savez(tmp_path / "c.npz", x=x, y=names[y], classes=names)  # with classes: their order is kept
    data = load_path(tmp_path / "c.npz")
    assert data.classes == tuple(names.tolist()) and np.array_equal(data.y.numpy(), y)


def test_npz_int_labels_with_classes(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    from fedleak.data.builtin import FASHION_CLASSES

    x, y = fashion_small
    np.savez_compressed(tmp_path / "f.npz", x=x, y=y.astype(np.uint8), classes=np.array(FASHION_CLASSES))
    data = load_path(tmp_path / "f.npz")
    assert data.classes == FASHION_CLASSES and np.array_equal(data.y.numpy(), y)


def test_npz_records_are_tabular_data_read_as_they_are(tmp_path: Path) -> None:
    """N x D records (tabular data) are N rows of D features, a 1 x 1 x D input each: integers are not taken for
    8-bit pixels, values outside [0, 1] need the file's value_range; a fedleak MLP attacks them as they are."""
    rng = np.random.default_rng(0)
    ages = np.stack([rng.integers(18, 90, 64), rng.integers(0, 2, 64)], 1)  # not pixels: 45 stays 45
    np.savez(tmp_path / "ages.npz", x=ages, y=ages[:, 1], value_range=np.array([0.0, 100.0]))
    data = load_path(tmp_path / "ages.npz")
    assert data.input_shape == (1, 1, 2) and data.value_range == (0.0, 100.0)
    assert torch.equal(data.x.reshape(64, 2), torch.from_numpy(ages).float())
    x = rng.normal(size=(200, 24)).astype(np.float32)
    np.savez(tmp_path / "tab.npz", x=x, y=(x[:, 0] > 0).astype(np.int64), value_range=np.array([-6.0, 6.0]))
    data = load_path(tmp_path / "tab.npz")
    model = fedleak.make_mlp(data.input_shape, [512], data.num_classes, seed=0)
    xb, yb = data.batch(4, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, xb, yb))
    scores = fedleak.metrics.match(rec, xb, yb, data_range=data.value_range)
    assert scores.recovered_fraction == 1.0 and not scores.false_certificate.any()


# --- image folder --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_grey_image_folder_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray],
                                      suffix: str) -> None:
    x, y = fashion_small
    write_image_folder(tmp_path / "imgs", x, y, suffix)
    (tmp_path / "imgs" / "README.txt").write_text("not a class")  # loose files at the top are ignored
    (tmp_path / "imgs" / "class_00" / "notes.txt").write_text("not an image")  # so are non-image files
    data = fedleak.load_dataset(tmp_path / "imgs")
    assert data.classes == tuple(f"class_{c:02d}" for c in range(10))
    assert data.input_shape == (1, 28, 28)
    order = np.argsort(y, kind="stable")  # folders are read class by class, files in name order
    assert np.array_equal(data.y.numpy(), y[order])
    assert np.array_equal(to_uint8(data.x[:, 0]), x[order])
    assert torch.equal(data.x[:, 0], torch.from_numpy(x[order]).float() / 255.0)


def test_colour_image_folder_round_trip(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    write_image_folder(tmp_path / "rgb", x, y)
    data = load_path(tmp_path / "rgb")
    assert data.input_shape == (3, 32, 32) and len(data) == len(x)
    order = np.argsort(y, kind="stable")
    assert np.array_equal(to_uint8(data.x), x[order]) and np.array_equal(data.y.numpy(), y[order])


def test_mixed_grey_and_colour_become_rgb(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = retina_small
    grey = x[:3, 1]  # real pixels, saved as single-channel images
    write_image_folder(tmp_path / "mix", grey, np.zeros(3, dtype=np.int64))
    write_image_folder(tmp_path / "mix", x[3:6], np.ones(3, dtype=np.int64))
    data = load_path(tmp_path / "mix")
    assert data.input_shape == (3, 32, 32)
    for c in range(3):  # grey images are repeated into all three channels
        assert np.array_equal(to_uint8(data.x[:3, c]), grey)
    assert np.array_equal(to_uint8(data.x[3:]), x[3:6])


# --- CIFAR python batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("byte_keys", "protocol"), [(True, 2), (False, 4), (False, 5)])
def test_cifar10_round_trip(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray],
                            byte_keys: bool, protocol: int) -> None:
    x, y = retina_small
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))  # mix the classes across batches
    x, y = x[perm], y[perm]
    write_cifar10(tmp_path / "cifar", x, y, byte_keys=byte_keys, protocol=protocol)
    test = fedleak.load_dataset(tmp_path / "cifar")  # the test split by default
    assert test.name == "cifar:test" and test.classes == ("background", "vessel")
    assert test.input_shape == (3, 32, 32)
    assert np.array_equal(to_uint8(test.x), x[40:]) and np.array_equal(test.y.numpy(), y[40:])
    train = fedleak.load_dataset(tmp_path / "cifar", split="train")
    assert np.array_equal(to_uint8(train.x), x[:40]) and np.array_equal(train.y.numpy(), y[:40])


def test_cifar100_layout(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, sl in {"train": slice(0, 40), "test": slice(40, 60)}.items():
        batch = {b"data": x[sl].reshape(-1, 3072), b"fine_labels": y[sl].tolist(), b"coarse_labels": [0] * 20}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"bg", b"vessel"]}, protocol=2))
    data = load_path(root, split="train")
    assert data.classes == ("bg", "vessel") and np.array_equal(to_uint8(data.x), x[:40])


# --- IDX folders ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray], gz: bool) -> None:
    x, y = fashion_small
    write_idx(tmp_path / "mnist", "train", x[:80], y[:80], gz)
    write_idx(tmp_path / "mnist", "t10k", x[80:], y[80:], gz)
    test = fedleak.load_dataset(tmp_path / "mnist")
    assert test.name == "mnist:test" and len(test) == 40 and test.input_shape == (1, 28, 28)
    assert np.array_equal(to_uint8(test.x[:, 0]), x[80:]) and np.array_equal(test.y.numpy(), y[80:])
    train = fedleak.load_dataset(tmp_path / "mnist", split="train")
    assert np.array_equal(to_uint8(train.x[:, 0]), x[:80]) and np.array_equal(train.y.numpy(), y[:80])
    assert train.classes == tuple(str(i) for i in range(10))


def test_idx_folder_like_debian_fashion_mnist(tmp_path: Path) -> None:
    """The installed Debian folder itself is an IDX folder; classes.txt names its classes."""
    from fedleak.data.builtin import FASHION_CLASSES, FASHION_MNIST_DIR

    root = tmp_path / "fm"
    root.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / name).symlink_to(FASHION_MNIST_DIR / name)
    (root / "classes.txt").write_text("\n".join(FASHION_CLASSES) + "\n")
    data = load_path(root)
    builtin = fedleak.load_dataset("fashion-mnist")
    assert data.classes == FASHION_CLASSES
    assert torch.equal(data.x, builtin.x) and torch.equal(data.y, builtin.y)


def test_idx_only_train_split_is_the_default(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    write_idx(tmp_path / "m", "train", x, y, gz=False)
    assert load_path(tmp_path / "m").name == "m:train"
    with pytest.raises(DataError, match="has no test split"):
        load_path(tmp_path / "m", split="test")
