"""User data formats: round trips of real images through every format, and bad input."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedleak
from fedleak.data import available_formats, load_path
from fedleak.errors import DataError


def _uint8(x: torch.Tensor) -> np.ndarray:
    return x.mul(255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def fashion_small() -> tuple[np.ndarray, np.ndarray]:
    """120 real Fashion-MNIST test images (uint8 N x 28 x 28) with 12 of each class, and their labels."""
    data = fedleak.load_dataset("fashion-mnist")
    idx = torch.cat([torch.nonzero(data.y == c)[:12, 0] for c in range(10)])
    return _uint8(data.x[idx, 0]), data.y[idx].numpy()


@pytest.fixture(scope="module")
def retina_small() -> tuple[np.ndarray, np.ndarray]:
    """60 real retina patches as uint8 N x 3 x 32 x 32 (CIFAR's layout), and their labels."""
    data = fedleak.load_dataset("retina")
    idx = torch.cat([torch.nonzero(data.y == c)[:30, 0] for c in range(2)])
    return _uint8(data.x[idx]), data.y[idx].numpy()


def test_formats_are_registered_in_order() -> None:
    assert list(available_formats()) == ["cifar", "idx", "image-folder", "npz", "csv"]


# --- npz -----------------------------------------------------------------------------------------------------

def test_npz_uint8_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    np.savez(tmp_path / "fashion.npz", x=x, y=y)
    data = fedleak.load_dataset(tmp_path / "fashion.npz")
    assert data.name == "fashion" and data.input_shape == (1, 28, 28) and len(data) == 120
    assert np.array_equal(_uint8(data.x[:, 0]), x)
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


# --- image folder --------------------------------------------------------------------------------------------

def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray, suffix: str = ".png") -> None:
    for k, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = img.transpose(1, 2, 0) if img.ndim == 3 else img
        Image.fromarray(arr).save(folder / f"{k:04d}{suffix}")


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_grey_image_folder_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray],
                                      suffix: str) -> None:
    x, y = fashion_small
    _write_folder(tmp_path / "imgs", x, y, suffix)
    (tmp_path / "imgs" / "README.txt").write_text("not a class")  # loose files at the top are ignored
    (tmp_path / "imgs" / "class_00" / "notes.txt").write_text("not an image")  # so are non-image files
    data = fedleak.load_dataset(tmp_path / "imgs")
    assert data.classes == tuple(f"class_{c:02d}" for c in range(10))
    assert data.input_shape == (1, 28, 28)
    order = np.argsort(y, kind="stable")  # folders are read class by class, files in name order
    assert np.array_equal(data.y.numpy(), y[order])
    assert np.array_equal(_uint8(data.x[:, 0]), x[order])
    assert torch.equal(data.x[:, 0], torch.from_numpy(x[order]).float() / 255.0)


def test_colour_image_folder_round_trip(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    _write_folder(tmp_path / "rgb", x, y)
    data = load_path(tmp_path / "rgb")
    assert data.input_shape == (3, 32, 32) and len(data) == len(x)
    order = np.argsort(y, kind="stable")
    assert np.array_equal(_uint8(data.x), x[order]) and np.array_equal(data.y.numpy(), y[order])


def test_mixed_grey_and_colour_become_rgb(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = retina_small
    grey = x[:3, 1]  # real pixels, saved as single-channel images
    _write_folder(tmp_path / "mix", grey, np.zeros(3, dtype=np.int64))
    _write_folder(tmp_path / "mix", x[3:6], np.ones(3, dtype=np.int64))
    data = load_path(tmp_path / "mix")
    assert data.input_shape == (3, 32, 32)
    for c in range(3):  # grey images are repeated into all three channels
        assert np.array_equal(_uint8(data.x[:3, c]), grey)
    assert np.array_equal(_uint8(data.x[3:]), x[3:6])


# --- CIFAR python batches ------------------------------------------------------------------------------------

def _cifar_batch(images: np.ndarray, labels: np.ndarray, name: str, *, byte_keys: bool) -> dict[object, object]:
    batch = {
        "batch_label": f"{name} of 2".encode(),
        "labels": [int(v) for v in labels],
        "data": images.reshape(len(images), -1),  # N x 3072, channel-major rows like CIFAR's
        "filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return {k.encode(): v for k, v in batch.items()} if byte_keys else batch


def _write_cifar10(root: Path, x: np.ndarray, y: np.ndarray, *, byte_keys: bool = True, protocol: int = 2) -> None:
    root.mkdir()
    parts = {"data_batch_1": slice(0, 20), "data_batch_2": slice(20, 40), "test_batch": slice(40, 60)}
    for name, sl in parts.items():
        with open(root / name, "wb") as fh:
            pickle.dump(_cifar_batch(x[sl], y[sl], name, byte_keys=byte_keys), fh, protocol=protocol)
    meta = {b"label_names": [b"background", b"vessel"], b"num_cases_per_batch": 20, b"num_vis": 3072}
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)


@pytest.mark.parametrize(("byte_keys", "protocol"), [(True, 2), (False, 4), (False, 5)])
def test_cifar10_round_trip(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray],
                            byte_keys: bool, protocol: int) -> None:
    x, y = retina_small
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))  # mix the classes across batches
    x, y = x[perm], y[perm]
    _write_cifar10(tmp_path / "cifar", x, y, byte_keys=byte_keys, protocol=protocol)
    test = fedleak.load_dataset(tmp_path / "cifar")  # the test split by default
    assert test.name == "cifar:test" and test.classes == ("background", "vessel")
    assert test.input_shape == (3, 32, 32)
    assert np.array_equal(_uint8(test.x), x[40:]) and np.array_equal(test.y.numpy(), y[40:])
    train = fedleak.load_dataset(tmp_path / "cifar", split="train")
    assert np.array_equal(_uint8(train.x), x[:40]) and np.array_equal(train.y.numpy(), y[:40])


def test_cifar100_layout(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, sl in {"train": slice(0, 40), "test": slice(40, 60)}.items():
        batch = {b"data": x[sl].reshape(-1, 3072), b"fine_labels": y[sl].tolist(), b"coarse_labels": [0] * 20}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"bg", b"vessel"]}, protocol=2))
    data = load_path(root, split="train")
    assert data.classes == ("bg", "vessel") and np.array_equal(_uint8(data.x), x[:40])


# --- IDX folders ---------------------------------------------------------------------------------------------

def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape) + arr.tobytes()


def _write_idx(root: Path, prefix: str, x: np.ndarray, y: np.ndarray, gz: bool) -> None:
    root.mkdir(exist_ok=True)
    for what, dims, arr in (("images", "idx3", x), ("labels", "idx1", y.astype(np.uint8))):
        name = root / f"{prefix}-{what}-{dims}-ubyte{'.gz' if gz else ''}"
        name.write_bytes(gzip.compress(_idx(arr)) if gz else _idx(arr))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray], gz: bool) -> None:
    x, y = fashion_small
    _write_idx(tmp_path / "mnist", "train", x[:80], y[:80], gz)
    _write_idx(tmp_path / "mnist", "t10k", x[80:], y[80:], gz)
    test = fedleak.load_dataset(tmp_path / "mnist")
    assert test.name == "mnist:test" and len(test) == 40 and test.input_shape == (1, 28, 28)
    assert np.array_equal(_uint8(test.x[:, 0]), x[80:]) and np.array_equal(test.y.numpy(), y[80:])
    train = fedleak.load_dataset(tmp_path / "mnist", split="train")
    assert np.array_equal(_uint8(train.x[:, 0]), x[:80]) and np.array_equal(train.y.numpy(), y[:80])
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
    _write_idx(tmp_path / "m", "train", x, y, gz=False)
    assert load_path(tmp_path / "m").name == "m:train"
    with pytest.raises(DataError, match="has no test split"):
        load_path(tmp_path / "m", split="test")


# --- bad input -----------------------------------------------------------------------------------------------

def _raises(path: Path, problem: str, **kwargs: object) -> DataError:
    with pytest.raises(DataError, match=problem) as info:
        fedleak.load_dataset(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    err = _raises(tmp_path / "nope.npz", "neither a built-in data set")
    assert "nope.npz" in str(err)
    with pytest.raises(DataError, match="does not exist"):
        load_path(tmp_path / "nope.npz")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "empty" in str(_raises(tmp_path / "empty", "is empty"))


def test_folder_without_class_folders(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    Image.fromarray(fashion_small[0][0]).save(tmp_path / "a.png")
    _raises(tmp_path, "has no sub-folders; an image folder needs one sub-folder")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text("[1, 2, 3]\n")
    err = _raises(tmp_path / "data.json", "cannot tell the format")
    assert "data.json" in str(err) and "npz" in str(err) and "csv" in str(err)


def test_bad_split(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    np.savez(tmp_path / "f.npz", x=fashion_small[0], y=fashion_small[1])
    _raises(tmp_path / "f.npz", "has no train/test splits", split="train")
    _raises(tmp_path / "f.npz", "split must be one of train, test", split="validation")


def test_corrupt_npz(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive at all")
    assert "junk.npz" in str(_raises(tmp_path / "junk.npz", "corrupt or truncated .npz"))
    np.savez(tmp_path / "ok.npz", x=fashion_small[0], y=fashion_small[1])
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    assert "cut.npz" in str(_raises(tmp_path / "cut.npz", "corrupt or truncated .npz"))


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.zeros((4, 8, 8), np.uint8)}, "needs arrays 'x' and 'y'; missing y"),
        ({"x": np.zeros((4, 8, 8), np.uint8), "y": np.zeros(5, np.int64)}, "does not hold one image"),
        ({"x": np.full((2, 8, 8), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN"),
        ({"x": np.full((2, 8, 8), 3.5, np.float32), "y": np.zeros(2, np.int64)}, r"must lie in \[0, 1\]"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, -1])}, "must not be negative"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0.5, 1.0])}, "the labels hold non-integer numbers"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, 3]), "classes": np.array(["a", "b"])},
         r"labels must lie in \[0, 1\]"),
        ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array(["a", "c"]), "classes": np.array(["a", "b"])},
         "not in 'classes'"),
        ({"x": np.zeros((2, 1, 3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, "does not hold one image"),
        ({"x": np.full((2, 8), -0.5, np.float32), "y": np.zeros(2, np.int64)}, r"records \(N x D\) with values in "
                                                                               r"\[-0.5, -0.5\].*'value_range'"),
    ],
)
def test_bad_npz_contents(tmp_path: Path, arrays: dict[str, np.ndarray], problem: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    assert "bad.npz" in str(_raises(tmp_path / "bad.npz", problem))


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


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    np.savez(tmp_path / "obj.npz", x=np.zeros((2, 4, 4), np.uint8),
             y=np.array([_Evil(str(marker)), 0], dtype=object))
    _raises(tmp_path / "obj.npz", "pickled Python objects")
    assert not marker.exists()


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_corrupt_image_names_the_file(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    _write_folder(tmp_path / "imgs", x[:20], y[:20])
    victim = sorted((tmp_path / "imgs" / f"class_{y[0]:02d}").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    err = _raises(tmp_path / "imgs", "cannot read the image")
    assert victim.name in str(err)


def test_image_size_mismatch_names_the_file(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    _write_folder(tmp_path / "imgs", x[:20], y[:20])
    odd = tmp_path / "imgs" / f"class_{y[19]:02d}" / "9999.png"
    Image.fromarray(x[0][:20, :24]).save(odd)
    err = _raises(tmp_path / "imgs", "all images must have the same size")
    assert "9999.png" in str(err) and "24x20" in str(err) and "28x28" in str(err)


def test_empty_class_folder(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    _write_folder(tmp_path / "imgs", fashion_small[0][:5], fashion_small[1][:5])
    (tmp_path / "imgs" / "zz_empty").mkdir()
    assert "zz_empty" in str(_raises(tmp_path / "imgs", "class folder holds no images"))


def test_idx_count_mismatch(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    root = tmp_path / "m"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx(x))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(y[:-1].astype(np.uint8)))
    err = _raises(root, "counts must match")
    assert "t10k-images-idx3-ubyte holds 120 images" in str(err) and "119 labels" in str(err)


def test_idx_truncated_and_missing_files(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    root = tmp_path / "m"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx(x)[:-100])
    _raises(root, "has no labels")
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(y.astype(np.uint8)))
    assert "t10k-images-idx3-ubyte" in str(_raises(root, "truncated or corrupt"))


def test_cifar_malicious_pickle_runs_nothing(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    _write_cifar10(tmp_path / "cifar", x, y)
    marker = tmp_path / "pwned"
    batch = _cifar_batch(x[40:], y[40:], "test", byte_keys=True)
    batch[b"labels"] = _Evil(str(marker))
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    err = _raises(tmp_path / "cifar", "refuses anything else")
    assert "test_batch" in str(err) and "system" in str(err)
    assert not marker.exists()
    assert len(load_path(tmp_path / "cifar", split="train")) == 40  # the clean split still loads


def test_cifar_label_count_mismatch(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    _write_cifar10(tmp_path / "cifar", x, y)
    batch = _cifar_batch(x[40:], y[40:], "test", byte_keys=True)
    batch[b"labels"] = batch[b"labels"][:-2]  # type: ignore[index]
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert "test_batch" in str(_raises(tmp_path / "cifar", "20 images but 18 labels"))


def test_cifar_truncated_pickle(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    _write_cifar10(tmp_path / "cifar", x, y)
    raw = (tmp_path / "cifar" / "data_batch_2").read_bytes()
    (tmp_path / "cifar" / "data_batch_2").write_bytes(raw[: len(raw) // 3])
    assert "data_batch_2" in str(_raises(tmp_path / "cifar", "corrupt or truncated pickle", split="train"))


def test_npz_with_normalisation_or_its_own_range(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.random((6, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "norm.npz", x=pixels, y=y, mean=np.array([0.5, 0.4, 0.3]), std=np.array([0.2, 0.25, 0.3]))
    data = fedleak.load_dataset(tmp_path / "norm.npz")
    assert data.normalization is not None and data.pixel_range == (0.0, 1.0)
    assert np.allclose(data.pixels(data.x).numpy(), pixels, atol=1e-6)
    np.savez(tmp_path / "pm1.npz", x=pixels * 2 - 1, y=y, value_range=np.array([-1.0, 1.0]))
    data = fedleak.load_dataset(tmp_path / "pm1.npz")
    assert data.value_range == (-1.0, 1.0) and float(data.x.min()) < 0 and data.normalization is None
    np.savez(tmp_path / "both.npz", x=pixels, y=y, value_range=np.array([0, 1.0]), mean=np.array([0.5]),
             std=np.array([0.5]))
    with pytest.raises(fedleak.DataError, match="not both"):
        fedleak.load_dataset(tmp_path / "both.npz")
    np.savez(tmp_path / "out.npz", x=pixels * 3, y=y, value_range=np.array([0, 1.0]))
    with pytest.raises(fedleak.DataError, match="value range"):
        fedleak.load_dataset(tmp_path / "out.npz")


def test_a_folder_states_its_normalisation(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    """A data folder (image folder, CIFAR) with normalization.json is loaded as its model sees it, as an .npz with
    mean/std is: the images normalised, the map kept for scores in pixel space; a bad file is one DataError."""
    x, y = retina_small
    _write_folder(tmp_path / "rgb", x, y)
    plain = load_path(tmp_path / "rgb")
    (tmp_path / "rgb" / "normalization.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
    seen = load_path(tmp_path / "rgb")
    assert seen.value_range == (-1.0, 1.0) and seen.pixel_range == (0.0, 1.0) and len(seen) == len(plain)
    assert torch.allclose(seen.pixels(seen.x), plain.x, atol=1e-6) and torch.equal(seen.y, plain.y)
    _write_cifar10(tmp_path / "cifar", x, y)
    (tmp_path / "cifar" / "normalization.json").write_text('{"mean": 0.5, "std": 0.25}')
    assert fedleak.load_dataset(tmp_path / "cifar", split="train").value_range == (-2.0, 2.0)
    for text, problem in [("[0.5]", 'keys "mean" and "std"'), ('{"mean": 0.5}', 'keys "mean" and "std"'),
                          ("{mean: 1}", "cannot read it as JSON"),
                          ('{"mean": [0.5, 0.5], "std": [1, 1]}', "got 2 means"),
                          ('{"mean": 0.5, "std": -1}', "positive stds")]:
        (tmp_path / "rgb" / "normalization.json").write_text(text)
        _raises(tmp_path / "rgb", problem)
