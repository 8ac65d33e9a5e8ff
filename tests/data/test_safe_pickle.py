"""The restricted unpickler: numpy arrays and plain containers load; any other global is refused unexecuted."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedleak.data.safe_pickle import load_restricted
from fedleak.errors import DataError


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_and_containers_round_trip(tmp_path: Path, protocol: int) -> None:
    obj = {"data": np.arange(24, dtype=np.uint8).reshape(4, 6), "f": np.linspace(0, 1, 5, dtype=">f4"),
           "labels": [3, 1, 4], "names": [b"a", b"b"], "n": np.int64(7), "t": (1, 2.5, None, True)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = load_restricted(path)
    data_key = b"data" if protocol < 3 and b"data" in out else "data"
    assert np.array_equal(out[data_key], obj["data"])
    assert out["labels"] == [3, 1, 4] and out["names"] == [b"a", b"b"] and int(out["n"]) == 7
    assert np.array_equal(out["f"], obj["f"])


class _Reduce:
    def __init__(self, fn: object, args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (self.fn, self.args)


@pytest.mark.parametrize("kind", ["os.system", "subprocess", "eval", "codecs"])
def test_code_execution_is_refused(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    payload = {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "subprocess": _Reduce(subprocess.call, (["touch", str(marker)],)),
        "eval": _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "codecs": _Reduce(__import__("_codecs").encode, (b"x", "zlib_codec")),  # an allowed name, misused
    }[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": [payload]}, protocol=2))
    with pytest.raises(DataError) as info:
        load_restricted(path)
    assert str(path) in str(info.value) and ("refus" in str(info.value))
    assert not marker.exists()


def test_garbage_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(DataError, match="corrupt or truncated pickle"):
        load_restricted(path)


def test_python2_style_pickle_with_numpy1_names(tmp_path: Path) -> None:
    """CIFAR's own files: Python 2 byte-string keys and numpy 1's ``numpy.core`` module names."""
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = pickle.dumps({"data": arr, "labels": [1, 0, 1]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    for key in (b"data", b"labels"):  # BINUNICODE key -> Python 2's SHORT_BINSTRING
        raw = raw.replace(b"X" + len(key).to_bytes(4, "little") + key, b"U" + bytes([len(key)]) + key)
    assert b"numpy.core.multiarray" in raw and b"Ulabels"[:1] + bytes([6]) + b"labels" in raw
    path = tmp_path / "py2_batch"
    path.write_bytes(raw)
    out = load_restricted(path)
    assert set(out) == {b"data", b"labels"}
    assert np.array_equal(out[b"data"], arr) and out[b"labels"] == [1, 0, 1]
