"""The IDX file format (MNIST, Fashion-MNIST): read by the built-in sets and by the user-data readers.

A module of its own so that :mod:`fedleak.data.builtin` (which registers data sets) and :mod:`fedleak.data.files`
(which :mod:`fedleak.data.registry` loads paths with) share it without importing each other.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from fedleak.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not, told by its magic bytes) into a numpy array, checking its header."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None
    if raw[:2] == GZIP_MAGIC:
        try:
            data = zlib.decompress(raw, wbits=31)  # faster than gzip.open for whole files
        except zlib.error as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    else:
        data = raw
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data, file holds {len(data) - header} "
                        "(truncated or corrupt file)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
