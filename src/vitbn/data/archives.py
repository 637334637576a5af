"""Readers of the official archives of CIFAR-10, CIFAR-100, SVHN and EMNIST, without pickle.

Each reader takes the verified archive files and returns the train and test splits as uint8 (N, C, H, W) tensors
with int64 labels, and the class names. Layouts (those of the files the datasets' pages publish):

- CIFAR-10 binary (``cifar-10-binary.tar.gz``): ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and
  ``test_batch.bin``, records of 1 label byte then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 in
  row order); class names one per line in ``batches.meta.txt``.
- CIFAR-100 binary (``cifar-100-binary.tar.gz``): ``cifar-100-binary/train.bin`` and ``test.bin``, records of a
  coarse label byte, a fine label byte, then the 3072 pixel bytes; names in ``fine_label_names.txt`` and
  ``coarse_label_names.txt``.
- SVHN (``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``, MATLAB v5): ``X`` (32, 32, 3, N) uint8 and
  ``y`` (N, 1) with label 10 for the digit 0.
- EMNIST (``gzip.zip``): ``gzip/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`` (IDX, each image
  stored transposed) and ``gzip/emnist-<split>-mapping.txt`` (``label code [code]`` per line).

The tar archives are read as a stream, member by member, and only the members a dataset needs are kept; SVHN's
files are loaded one at a time into a preallocated split (their sizes read from the headers first); an EMNIST split
reads only its own four members of the zip. Memory stays within about twice the decoded split.
"""

from __future__ import annotations

import gzip
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitbn.data.base import Split, check_labels
from vitbn.data.idx import parse_idx
from vitbn.errors import UserError

CIFAR_PIXELS = 3 * 32 * 32
SVHN_CLASSES = tuple(str(k) for k in range(10))
_SVHN_CHUNK = 8192  # images per transposed copy


def _tar_members(archive: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the members ``wanted`` of a .tar.gz, read in one streaming pass."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")  # archives made with `tar -C dir .` name members ./x
                if name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    found[name] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise UserError(f"{archive}: cannot read the tar.gz archive ({exc})") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise UserError(f"{archive}: member(s) {', '.join(missing)} missing (not the official layout)")
    return found


def _names(text: bytes, count: int, source: str) -> list[str]:
    names = [line.strip() for line in text.decode("utf-8", errors="replace").splitlines() if line.strip()]
    if len(names) != count:
        raise UserError(f"{source}: {len(names)} class names, expected {count}")
    return names


def _cifar_split(chunks: Sequence[bytes], label_bytes: int, label_index: int, classes: int, source: str) -> Split:
    """Records ``label bytes + 3072 pixel bytes`` -> (N, 3, 32, 32) images and the labels at ``label_index``."""
    record = label_bytes + CIFAR_PIXELS
    for chunk in chunks:
        if len(chunk) % record:
            raise UserError(f"{source}: {len(chunk)} bytes is not a whole number of {record}-byte records")
    n = sum(len(chunk) // record for chunk in chunks)
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    labels = np.empty(n, dtype=np.int64)
    start = 0
    for chunk in chunks:
        rows = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, record)  # a view: no copy of the chunk
        stop = start + len(rows)
        images[start:stop] = torch.from_numpy(rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
        labels[start:stop] = rows[:, label_index]
        start = stop
    check_labels(labels, classes, source)
    return Split(images, torch.from_numpy(labels))


def read_cifar10(paths: dict[str, Path]) -> tuple[Split, Split, list[str]]:
    """CIFAR-10 from ``cifar-10-binary.tar.gz``: 50000 training and 10000 test images in 10 classes."""
    archive = paths["cifar-10-binary.tar.gz"]
    folder = "cifar-10-batches-bin"
    train_names = [f"{folder}/data_batch_{k}.bin" for k in range(1, 6)]
    test_name, meta = f"{folder}/test_batch.bin", f"{folder}/batches.meta.txt"
    members = _tar_members(archive, [*train_names, test_name, meta])
    classes = _names(members.pop(meta), 10, f"{archive}:{meta}")
    train = _cifar_split([members.pop(name) for name in train_names], 1, 0, 10, f"{archive}:{folder}/data_batch_*")
    test = _cifar_split([members.pop(test_name)], 1, 0, 10, f"{archive}:{test_name}")
    return train, test, classes


def _read_cifar100(paths: dict[str, Path], coarse: bool) -> tuple[Split, Split, list[str]]:
    archive = paths["cifar-100-binary.tar.gz"]
    folder = "cifar-100-binary"
    names_member = f"{folder}/{'coarse' if coarse else 'fine'}_label_names.txt"
    count, index = (20, 0) if coarse else (100, 1)
    members = _tar_members(archive, [f"{folder}/train.bin", f"{folder}/test.bin", names_member])
    classes = _names(members.pop(names_member), count, f"{archive}:{names_member}")
    splits = [
        _cifar_split([members.pop(f"{folder}/{part}.bin")], 2, index, count, f"{archive}:{folder}/{part}.bin")
        for part in ("train", "test")
    ]
    return splits[0], splits[1], classes


def read_cifar100(paths: dict[str, Path]) -> tuple[Split, Split, list[str]]:
    """CIFAR-100 with its 100 fine labels, from ``cifar-100-binary.tar.gz``."""
    return _read_cifar100(paths, coarse=False)


def read_cifar100_coarse(paths: dict[str, Path]) -> tuple[Split, Split, list[str]]:
    """CIFAR-100 with its 20 coarse labels (superclasses), from ``cifar-100-binary.tar.gz``."""
    return _read_cifar100(paths, coarse=True)


def _svhn_count(path: Path) -> int:
    """The number of images of an SVHN .mat file, from its header (``whosmat``: nothing is loaded)."""
    import scipy.io

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
    except (ValueError, OSError, TypeError, NotImplementedError) as exc:  # scipy's MatReadError is a ValueError
        raise UserError(f"{path}: cannot read the .mat file ({exc})") from None
    x = shapes.get("X")
    if x is None or len(x) != 4 or tuple(x[:3]) != (32, 32, 3):
        raise UserError(f"{path}: X has shape {x}; expected (32, 32, 3, N) (not SVHN's layout)")
    return int(x[3])


def _fill_svhn(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Loads one SVHN .mat into ``images`` (n, 3, 32, 32) and ``labels`` (n,): ``X`` (32, 32, 3, n) uint8 and ``y``
    (n, 1) in 1..10, 10 being the digit 0. The transposition is copied in chunks, so the peak is the file's ``X``
    plus the output."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except (ValueError, OSError, TypeError, NotImplementedError) as exc:
        raise UserError(f"{path}: cannot read the .mat file ({exc})") from None
    if "X" not in mat or "y" not in mat:
        raise UserError(f"{path}: the .mat file lacks {'X' if 'X' not in mat else 'y'} (not SVHN's layout)")
    x, y = mat.pop("X"), mat.pop("y").reshape(-1)
    if x.dtype != np.uint8 or x.shape != (32, 32, 3, len(images)):
        raise UserError(f"{path}: X is {x.dtype.name} of shape {x.shape}; expected uint8 (32, 32, 3, {len(images)})")
    if len(y) != len(images) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: y has {len(y)} {y.dtype.name} labels for {len(images)} images")
    digits = y.astype(np.int64)
    check_labels(digits - 1, 10, str(path))  # 1..10 as stored
    digits[digits == 10] = 0
    labels.copy_(torch.from_numpy(digits))
    for start in range(0, len(images), _SVHN_CHUNK):  # (H, W, C, n) -> (n, C, H, W)
        part = x[..., start : start + _SVHN_CHUNK]
        images[start : start + part.shape[3]] = torch.from_numpy(np.ascontiguousarray(part.transpose(3, 2, 0, 1)))


def read_svhn_files(paths: Sequence[Path]) -> Split:
    """The images of SVHN .mat files, one after the other, in one preallocated split (loaded one file at a time)."""
    counts = [_svhn_count(path) for path in paths]
    images = torch.empty(sum(counts), 3, 32, 32, dtype=torch.uint8)
    labels = torch.empty(sum(counts), dtype=torch.int64)
    start = 0
    for path, count in zip(paths, counts):
        _fill_svhn(path, images[start : start + count], labels[start : start + count])
        start += count
    return Split(images, labels)


def read_svhn(paths: dict[str, Path]) -> tuple[Split, Split, list[str]]:
    """SVHN's cropped digits: ``train_32x32.mat`` (73257 images) and ``test_32x32.mat`` (26032)."""
    train, test = read_svhn_files([paths["train_32x32.mat"]]), read_svhn_files([paths["test_32x32.mat"]])
    return train, test, list(SVHN_CLASSES)


def read_svhn_extra(paths: dict[str, Path]) -> tuple[Split, Split, list[str]]:
    """SVHN with ``extra_32x32.mat`` (531131 easier images) after the training images."""
    train = read_svhn_files([paths["train_32x32.mat"], paths["extra_32x32.mat"]])
    return train, read_svhn_files([paths["test_32x32.mat"]]), list(SVHN_CLASSES)


def _zip_member(archive: zipfile.ZipFile, name: str, source: Path) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise UserError(f"{source}: member {name} missing (not the official layout)") from None
    except (zipfile.BadZipFile, OSError, zlib.error) as exc:
        raise UserError(f"{source}: cannot read member {name} ({exc})") from None


def _emnist_classes(text: bytes, count: int, source: str) -> tuple[int, list[str]]:
    """``(first label, class names)`` from a mapping file: ``label code [code]`` per line, labels consecutive."""
    mapping = {}
    for line in text.decode("ascii", errors="replace").splitlines():
        fields = line.split()
        if fields:
            mapping[int(fields[0])] = "/".join(dict.fromkeys(chr(int(code)) for code in fields[1:]))
    first = min(mapping, default=0)
    if sorted(mapping) != list(range(first, first + count)):
        raise UserError(f"{source}: labels {sorted(mapping)[:3]}... are not {count} consecutive labels")
    return first, [mapping[first + k] for k in range(count)]


def read_emnist(path: Path, split: str, count: int) -> tuple[Split, Split, list[str]]:
    """One EMNIST split from ``gzip.zip``: its four gzip IDX members and its mapping (labels shifted to start at
    0: the letters split stores 1..26), images turned upright (the files store them transposed)."""
    prefix = f"gzip/emnist-{split}"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path}: cannot read the zip archive ({exc})") from None
    with archive:
        first, classes = _emnist_classes(_zip_member(archive, f"{prefix}-mapping.txt", path), count, f"{path}")
        splits = []
        for part in ("train", "test"):
            arrays = []
            for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
                name = f"{prefix}-{part}-{kind}-ubyte.gz"
                try:
                    data = gzip.decompress(_zip_member(archive, name, path))
                except (OSError, EOFError, zlib.error) as exc:
                    raise UserError(f"{path}:{name}: corrupt gzip member ({exc})") from None
                array = parse_idx(data, f"{path}:{name}")
                del data  # the decoded copy is all that is kept
                if array.ndim != ndim or array.dtype != np.uint8:
                    raise UserError(
                        f"{path}:{name}: {array.dtype.name} of shape {array.shape}, expected {ndim}-D uint8"
                    )
                arrays.append(array)
            images, labels = arrays
            if len(images) != len(labels):
                raise UserError(f"{path}:{prefix}-{part}: {len(images)} images but {len(labels)} labels")
            labels = labels.astype(np.int64) - first
            check_labels(labels, count, f"{path}:{prefix}-{part}-labels-idx1-ubyte.gz")
            upright = np.ascontiguousarray(images.transpose(0, 2, 1))[:, None]  # (N, 1, H, W)
            splits.append(Split(torch.from_numpy(upright), torch.from_numpy(labels)))
    return splits[0], splits[1], classes
