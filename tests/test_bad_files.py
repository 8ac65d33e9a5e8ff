"""Bad data files and output paths get a clear error, and a failed run leaves no half-written set of outputs."""

from __future__ import annotations

import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from bad_input import raises

import fedleak
from fedleak.errors import OutputError
from fedleak.report.output import staged_output, write_atomic

# --- data files -----------------------------------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray, type_code: int) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _cifar(folder: Path, rows: int, labels: list) -> Path:
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((rows, 3 * 4 * 4), np.uint8), b"labels": labels}, fh, protocol=2)
    return folder


class TestDataFiles:
    def test_npz_with_no_images(self, tmp_path):
        np.savez(tmp_path / "d.npz", x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
        raises(fedleak.DataError, ("d.npz", "holds no images"), fedleak.load_dataset, tmp_path / "d.npz")

    def test_npz_with_a_huge_label_fails_fast(self, tmp_path):
        np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.float32), y=np.array([0, 10**12]))
        start = time.perf_counter()
        raises(fedleak.DataError, ("d.npz", "at most 100,000 classes"), fedleak.load_dataset, tmp_path / "d.npz")
        assert time.perf_counter() - start < 1.0

    def test_idx_with_a_huge_label_fails_fast(self, tmp_path):
        root = tmp_path / "idx"
        root.mkdir()
        _idx(root / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), 0x08)
        _idx(root / "t10k-labels-idx1-ubyte", np.array([0, 2**31 - 1], np.int32), 0x0C)
        start = time.perf_counter()
        raises(fedleak.DataError, ("t10k-labels-idx1-ubyte", "at most 100,000 classes"), fedleak.load_dataset, root)
        assert time.perf_counter() - start < 1.0

    def test_cifar_with_a_huge_label_fails_fast(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 2, [0, 10**12])
        start = time.perf_counter()
        raises(fedleak.DataError, ("cifar", "at most 100,000 classes"), fedleak.load_dataset, root)
        assert time.perf_counter() - start < 1.0

    def test_cifar_float_labels_are_not_truncated(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 2, [0.0, 1.5])
        raises(fedleak.DataError, ("cifar", "integer class indices"), fedleak.load_dataset, root)

    def test_cifar_with_no_images(self, tmp_path):
        root = _cifar(tmp_path / "cifar", 0, [])
        raises(fedleak.DataError, ("cifar", "holds no images"), fedleak.load_dataset, root)


# --- outputs --------------------------------------------------------------------------------------------------------


class TestOutputs:
    def test_staged_output_writes_everything_on_success(self, tmp_path):
        with staged_output(tmp_path / "out", ("a.txt", "b.txt")) as stage:
            write_atomic(stage / "a.txt", "a")
            write_atomic(stage / "b.txt", "b")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left

    def test_staged_output_writes_nothing_on_failure(self, tmp_path):
        with pytest.raises(RuntimeError):
            with staged_output(tmp_path / "out", ("a.txt", "b.txt")) as stage:
                write_atomic(stage / "a.txt", "a")
                raise RuntimeError("the second file failed")
        assert list(tmp_path.iterdir()) == []

    def test_staged_output_keeps_the_previous_outputs_on_failure(self, tmp_path):
        out = tmp_path / "out"
        out.mkdir()
        (out / "a.txt").write_text("old")
        with pytest.raises(OutputError, match="did not produce b.txt"):
            with staged_output(out, ("a.txt", "b.txt")) as stage:
                write_atomic(stage / "a.txt", "new")
        assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "old"

    def test_a_folder_in_the_way_is_refused_before_writing(self, tmp_path):
        (tmp_path / "out" / "b.txt").mkdir(parents=True)
        with pytest.raises(OutputError, match="folder of that name is in the way"):
            with staged_output(tmp_path / "out", ("a.txt", "b.txt")):
                pass
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.txt"]

    def test_write_atomic_to_a_folder(self, tmp_path):
        raises(OutputError, ("is a folder",), write_atomic, tmp_path, "text")
