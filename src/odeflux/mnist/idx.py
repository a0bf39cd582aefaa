"""The IDX file format (MNIST's): read with full checks, write atomically. Gzip or raw."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from .fileio import atomic_write_bytes

__all__ = ["MNISTDataError", "parse_idx", "read_idx", "write_idx"]


class MNISTDataError(ValueError):
    """A data file is missing, corrupt, truncated or not what was asked for; the message says which and what to do."""


# IDX type codes (third magic byte) -> big-endian numpy dtype.
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 16


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes (gzip-compressed or raw) into a native-endian, writable array.

    Checks the magic number, the dimensions and that the length is exactly what the dimensions
    require; any mismatch raises :class:`MNISTDataError` naming ``source``.
    """
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise MNISTDataError(f"{source}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < 4:
        raise MNISTDataError(f"{source}: {len(data)} bytes, too short for an IDX header (4 bytes at least)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _DTYPES or not 1 <= ndim <= _MAX_NDIM:
        raise MNISTDataError(
            f"{source}: magic number 0x{data[:4].hex()} is not an IDX magic "
            f"(expected 0x0000TTNN with type TT in {{08,09,0b,0c,0d,0e}} and 1 <= NN <= {_MAX_NDIM})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTDataError(f"{source}: truncated IDX header ({len(data)} bytes, the {ndim} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise MNISTDataError(
            f"{source}: {what}: dimensions {'x'.join(map(str, dims))} of {dtype.name} need "
            f"{expected} bytes, found {len(data)}"
        )
    # astype copies: the result is writable and native-endian (torch.from_numpy needs both).
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw, detected from the content) into a numpy array.

    Raises :class:`MNISTDataError` if the file is missing, or its magic number, dimensions or
    length are wrong.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MNISTDataError(f"{path}: no such file") from None
    except OSError as exc:
        raise MNISTDataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_idx(data, str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed (deterministically) when ``path`` ends in ``.gz``.

    The write is atomic: a temporary file in the same directory, fsync, then ``os.replace``.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES or array.ndim < 1 or array.ndim > _MAX_NDIM:
        raise ValueError(f"cannot write a {array.ndim}-d {array.dtype} array as IDX "
                         "(types: uint8, int8, int16, int32, float32, float64)")
    header = bytes([0, 0, _CODES[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return atomic_write_bytes(path, data)
