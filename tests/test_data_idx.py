"""The IDX reader: round trips through the writer, and a one-line UserError for every kind of bad file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from vitbn.data.idx import encode_idx, parse_idx, read_idx, write_idx
from vitbn.errors import UserError


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[-7, 2**30], [5, -(2**31)]], dtype=np.int32),
        np.array([1.5, -2.25, 1e30], dtype=np.float32),
        np.array([-3, 4], dtype=np.int16),
        np.array([0.1, -1e-300], dtype=np.float64),
        np.array([-128, 127], dtype=np.int8),
    ],
    ids=["uint8-3d", "int32-2d", "float32", "int16", "float64", "int8"],
)
def test_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable: torch.from_numpy needs no copy and gives no warning
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_header_bytes_follow_the_format():
    data = encode_idx(np.zeros((2, 3), dtype=np.uint8))
    # magic 0x00000802 (uint8, 2 dims), then the big-endian dims 2 and 3, then 6 data bytes.
    assert data == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(6)
    assert encode_idx(np.array([1], dtype=">i4"))[4:] == bytes([0, 0, 0, 1, 0, 0, 0, 1])


def test_gzip_detected_by_content_and_deterministic(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    first = write_idx(tmp_path / "a.gz", array).read_bytes()
    assert first == write_idx(tmp_path / "b.gz", array).read_bytes()
    (tmp_path / "c.idx").write_bytes(first)  # gzip content without the .gz name
    np.testing.assert_array_equal(read_idx(tmp_path / "c.idx"), array)


def test_expected_ndim_and_dtype(tmp_path):
    path = write_idx(tmp_path / "a.idx", np.zeros((4, 2), dtype=np.int32))
    with pytest.raises(UserError, match=r"a\.idx: expected 3 dimensions, the file has shape \(4, 2\)"):
        read_idx(path, ndim=3)
    with pytest.raises(UserError, match=r"a\.idx: expected IDX data of type uint8, the file holds int32"):
        read_idx(path, dtype="uint8")


def test_truncated_gzip(tmp_path):
    good = write_idx(tmp_path / "good.gz", np.arange(1000, dtype=np.int32)).read_bytes()
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"cut\.gz: truncated gzip file"):
        read_idx(tmp_path / "cut.gz")


def test_corrupt_gzip(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(UserError, match=r"bad\.gz: corrupt gzip file"):
        read_idx(tmp_path / "bad.gz")


def test_not_gzip_although_named_gz(tmp_path):
    write_idx(tmp_path / "raw.idx", np.zeros(3, dtype=np.uint8)).rename(tmp_path / "raw.gz")
    with pytest.raises(UserError, match=r"raw\.gz: not a gzip file"):
        read_idx(tmp_path / "raw.gz")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (bytes([0, 1, 8, 1, 0, 0, 0, 0]), r"bad IDX magic number 0x00010801"),
        (bytes([0x1F, 0, 8, 1, 0, 0, 0, 0]), r"bad IDX magic number 0x1f000801"),
        (bytes([0, 0, 8, 0]), r"bad IDX magic number 0x00000800"),
        (bytes([0, 0, 7, 1, 0, 0, 0, 0]), r"unknown IDX type code 0x07; allowed: 0x08, 0x09, 0x0b, 0x0c, 0x0d, 0x0e"),
        (bytes([0, 0, 8]), r"not an IDX file \(3 bytes"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2]), r"truncated IDX header \(8 bytes, 3 dimensions need 16\)"),
        (
            bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3]),
            r"IDX header says shape \(5,\) of uint8 \(5 data bytes\) but the file holds 3",
        ),
        (
            bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 1, 2, 3, 4, 5]),
            r"IDX header says shape \(1,\) of int32 \(4 data bytes\) but the file holds 5",
        ),
    ],
    ids=["magic-zero-bytes", "magic-first-byte", "zero-dims", "type-code", "short", "header", "truncated", "trailing"],
)
def test_bad_header_or_length(tmp_path, data, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(data)
    with pytest.raises(UserError, match=r"bad\.idx: " + match):
        read_idx(path)
    path.with_suffix(".gz").write_bytes(gzip.compress(data))  # the same checks after decompression
    with pytest.raises(UserError, match=r"bad\.gz: " + match):
        read_idx(path.with_suffix(".gz"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.gz: file not found"):
        read_idx(tmp_path / "nope.gz")


def test_parse_names_the_source():
    with pytest.raises(UserError, match=r"^mem: bad IDX magic"):
        parse_idx(b"\xff\xff\xff\xff", "mem")


def test_encode_rejects_other_dtypes():
    with pytest.raises(ValueError, match=r"dtype uint16 cannot be stored in IDX; allowed: uint8, int8"):
        encode_idx(np.zeros(2, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"IDX needs 1 to 255 dimensions"):
        encode_idx(np.array(3, dtype=np.uint8))
