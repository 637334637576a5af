"""Hand-made image files for the tests of the demo's input limits: a PNG of any declared size, built without
allocating its pixels."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit black PNG of ``width`` x ``height``: a few KiB on disk for a canvas of any size
    (each row is a filter byte and ceil(width / 8) zero bytes, compressed row by row)."""
    row = bytes(1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
