"""User data files that cannot be loaded: missing or unknown paths, corrupt, truncated or inconsistent files
of every format, and pickles that would run code; each is one DataError naming the file and the problem."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from data_files import cifar_batch, idx_bytes, raises_data_error, write_cifar10, write_image_folder
from PIL import Image

from fedleak.data import load_path
from fedleak.errors import DataError


def test_missing_path(tmp_path: Path) -> None:
    err = raises_data_error(tmp_path / "nope.npz", "neither a built-in data set")
    assert "nope.npz" in str(err)
    with pytest.raises(DataError, match="does not exist"):
        load_path(tmp_path / "nope.npz")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "empty" in str(raises_data_error(tmp_path / "empty", "is empty"))


def test_folder_without_class_folders(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    Image.fromarray(fashion_small[0][0]).save(tmp_path / "a.png")
    raises_data_error(tmp_path, "has no sub-folders; an image folder needs one sub-folder")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text("[1, 2, 3]\n")
    err = raises_data_error(tmp_path / "data.json", "cannot tell the format")
    assert "data.json" in str(err) and "npz" in str(err) and "csv" in str(err)


def test_bad_split(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    np.savez(tmp_path / "f.npz", x=fashion_small[0], y=fashion_small[1])
    raises_data_error(tmp_path / "f.npz", "has no train/test splits", split="train")
    raises_data_error(tmp_path / "f.npz", "split must be one of train, test", split="validation")


def test_corrupt_npz(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive at all")
    assert "junk.npz" in str(raises_data_error(tmp_path / "junk.npz", "corrupt or truncated .npz"))
    np.savez(tmp_path / "ok.npz", x=fashion_small[0], y=fashion_small[1])
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    assert "cut.npz" in str(raises_data_error(tmp_path / "cut.npz", "corrupt or truncated .npz"))


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
    assert "bad.npz" in str(raises_data_error(tmp_path / "bad.npz", problem))


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    np.savez(tmp_path / "obj.npz", x=np.zeros((2, 4, 4), np.uint8),
             y=np.array([_Evil(str(marker)), 0], dtype=object))
    raises_data_error(tmp_path / "obj.npz", "pickled Python objects")
    assert not marker.exists()


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_corrupt_image_names_the_file(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    write_image_folder(tmp_path / "imgs", x[:20], y[:20])
    victim = sorted((tmp_path / "imgs" / f"class_{y[0]:02d}").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated PNG
    err = raises_data_error(tmp_path / "imgs", "cannot read the image")
    assert victim.name in str(err)


def test_image_size_mismatch_names_the_file(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    write_image_folder(tmp_path / "imgs", x[:20], y[:20])
    odd = tmp_path / "imgs" / f"class_{y[19]:02d}" / "9999.png"
    Image.fromarray(x[0][:20, :24]).save(odd)
    err = raises_data_error(tmp_path / "imgs", "all images must have the same size")
    assert "9999.png" in str(err) and "24x20" in str(err) and "28x28" in str(err)


def test_empty_class_folder(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    write_image_folder(tmp_path / "imgs", fashion_small[0][:5], fashion_small[1][:5])
    (tmp_path / "imgs" / "zz_empty").mkdir()
    assert "zz_empty" in str(raises_data_error(tmp_path / "imgs", "class folder holds no images"))


def test_idx_count_mismatch(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    root = tmp_path / "m"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x))
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y[:-1].astype(np.uint8)))
    err = raises_data_error(root, "counts must match")
    assert "t10k-images-idx3-ubyte holds 120 images" in str(err) and "119 labels" in str(err)


def test_idx_truncated_and_missing_files(tmp_path: Path, fashion_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = fashion_small
    root = tmp_path / "m"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(x)[:-100])
    raises_data_error(root, "has no labels")
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(y.astype(np.uint8)))
    assert "t10k-images-idx3-ubyte" in str(raises_data_error(root, "truncated or corrupt"))


def test_cifar_malicious_pickle_runs_nothing(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    write_cifar10(tmp_path / "cifar", x, y)
    marker = tmp_path / "pwned"
    batch = cifar_batch(x[40:], y[40:], "test", byte_keys=True)
    batch[b"labels"] = _Evil(str(marker))
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    err = raises_data_error(tmp_path / "cifar", "refuses anything else")
    assert "test_batch" in str(err) and "system" in str(err)
    assert not marker.exists()
    assert len(load_path(tmp_path / "cifar", split="train")) == 40  # the clean split still loads


def test_cifar_label_count_mismatch(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    write_cifar10(tmp_path / "cifar", x, y)
    batch = cifar_batch(x[40:], y[40:], "test", byte_keys=True)
    batch[b"labels"] = batch[b"labels"][:-2]  # type: ignore[index]
    (tmp_path / "cifar" / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert "test_batch" in str(raises_data_error(tmp_path / "cifar", "20 images but 18 labels"))


def test_cifar_truncated_pickle(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = retina_small
    write_cifar10(tmp_path / "cifar", x, y)
    raw = (tmp_path / "cifar" / "data_batch_2").read_bytes()
    (tmp_path / "cifar" / "data_batch_2").write_bytes(raw[: len(raw) // 3])
    assert "data_batch_2" in str(raises_data_error(tmp_path / "cifar", "corrupt or truncated pickle", split="train"))
