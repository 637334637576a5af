"""Pure-NumPy reader and writer for the IDX format of MNIST and its relatives, raw or gzip-compressed.

An IDX file is a 4-byte magic number ``0x00 0x00 <type code> <number of dimensions>``, one big-endian uint32 per
dimension, then the data, big-endian, in C order. The reader checks every part of the header and that the data
is exactly as long as the header says, so a truncated or foreign file is reported instead of misread.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from vitbn.errors import UserError

# IDX type code -> big-endian NumPy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if it is gzip (detected by its magic bytes, not its name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != GZIP_MAGIC:
        if path.suffix == ".gz":
            raise UserError(f"{path}: not a gzip file (it does not start with the gzip magic bytes 1f 8b)")
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise UserError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
    except (OSError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt gzip file ({exc})") from None


def parse_idx(data: bytes, source: str | Path = "<bytes>") -> np.ndarray:
    """Decodes the bytes of an IDX file.

    Args:
        data: The uncompressed file content.
        source: The file name used in error messages.

    Returns:
        A writable array in native byte order with the header's shape and type.

    Raises:
        UserError: The magic number, the type code or the dimensions are invalid, or the data is not exactly as
            long as the header says.
    """
    if len(data) < 4:
        raise UserError(f"{source}: not an IDX file ({len(data)} bytes, shorter than the 4-byte magic number)")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or ndim == 0:
        raise UserError(
            f"{source}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            "(expected 0x0000TTNN: two zero bytes, a type code TT, a number of dimensions NN >= 1)"
        )
    if code not in IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise UserError(f"{source}: unknown IDX type code 0x{code:02x}; allowed: {allowed}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{source}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(
            f"{source}: IDX header says shape {shape} of {dtype.name} ({expected} data bytes) "
            f"but the file holds {len(data) - header} data bytes (truncated or not this format)"
        )
    flat = np.frombuffer(data, dtype=dtype, offset=header, count=expected // dtype.itemsize)
    # Copy into native byte order: writable (torch.from_numpy warns on read-only arrays) and fast to compute on.
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx(path: str | Path, *, ndim: int | None = None, dtype: np.dtype | str | None = None) -> np.ndarray:
    """Reads an IDX file, raw or gzip-compressed.

    Args:
        path: The file (``.gz`` files must be gzip; other files may be either).
        ndim: If given, the number of dimensions the file must have.
        dtype: If given, the data type the file must hold (e.g. ``"uint8"``).

    Returns:
        The array, in native byte order.

    Raises:
        UserError: A one-line message naming the file if it is missing, truncated, not gzip although named
            ``.gz``, has a bad header, or has another shape or type than asked.
    """
    path = Path(path)
    array = parse_idx(_read_bytes(path), path)
    if ndim is not None and array.ndim != ndim:
        raise UserError(f"{path}: expected {ndim} dimensions, the file has shape {array.shape}")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise UserError(f"{path}: expected IDX data of type {np.dtype(dtype).name}, the file holds {array.dtype.name}")
    return array


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes (uncompressed) of an array of one of the IDX types."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        allowed = ", ".join(dt.newbyteorder("=").name for dt in IDX_DTYPES.values())
        raise ValueError(f"dtype {array.dtype.name} cannot be stored in IDX; allowed: {allowed}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    big_endian = array.astype(IDX_DTYPES[code], copy=False)
    return header + np.ascontiguousarray(big_endian).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes an array as an IDX file, gzip-compressed if the name ends with ``.gz``, atomically.

    Args:
        path: The destination.
        array: An array of one of the IDX types (uint8, int8, int16, int32, float32, float64).

    Returns:
        The path written.
    """
    path = Path(path)
    data = encode_idx(array)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # mtime=0: the same array always gives the same bytes (and MD5)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
