"""Small archives in the exact layouts of the official CIFAR-10, CIFAR-100, SVHN and EMNIST files, for tests.

Each builder writes the archive with random content and returns what a correct reader must decode from it:
``{"train": (images (N, C, H, W) uint8, labels (N,) int64), "test": (...), "classes": [...]}``.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from vitbn.data.idx import encode_idx

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _images(rng: np.random.Generator, n: int, c: int = 3, side: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (n, c, side, side), dtype=np.uint8)


def write_cifar10(path: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """``cifar-10-binary.tar.gz``: 5 training batches of ``per_batch`` records and a test batch, plus the names."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, batches = {"classes": CIFAR10_NAMES}, []
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-bin/batches.meta.txt", ("\n".join(CIFAR10_NAMES) + "\n\n").encode())
        for name, n in [*((f"data_batch_{k}.bin", per_batch) for k in range(1, 6)), ("test_batch.bin", n_test)]:
            images, labels = _images(rng, n), rng.integers(0, 10, n, dtype=np.uint8)
            records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)  # label byte, R, G, B planes
            _add(tar, f"cifar-10-batches-bin/{name}", records.tobytes())
            batches.append((images, labels.astype(np.int64)))
        _add(tar, "cifar-10-batches-bin/readme.html", b"<html></html>")
    out["train"] = tuple(np.concatenate([b[k] for b in batches[:5]]) for k in (0, 1))
    out["test"] = batches[5]
    return out


def write_cifar100(path: Path, n_train: int = 10, n_test: int = 5, seed: int = 0) -> dict:
    """``cifar-100-binary.tar.gz``: train.bin and test.bin of (coarse, fine, pixels) records, and both name files.
    Returns the fine labels under train/test and the coarse ones under train_coarse/test_coarse."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fine, coarse = [f"fine{k}" for k in range(100)], [f"coarse{k}" for k in range(20)]
    out: dict = {"classes": fine, "coarse_classes": coarse}
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-100-binary/fine_label_names.txt", "\n".join(fine).encode())
        _add(tar, "cifar-100-binary/coarse_label_names.txt", "\n".join(coarse).encode())
        for part, n in (("train", n_train), ("test", n_test)):
            images = _images(rng, n)
            c, f = rng.integers(0, 20, n, dtype=np.uint8), rng.integers(0, 100, n, dtype=np.uint8)
            _add(tar, f"cifar-100-binary/{part}.bin", np.concatenate([c[:, None], f[:, None],
                                                                      images.reshape(n, -1)], 1).tobytes())  # fmt: skip
            out[part], out[f"{part}_coarse"] = (images, f.astype(np.int64)), (images, c.astype(np.int64))
    return out


def write_svhn_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN .mat (X: (32, 32, 3, N) uint8, y: (N, 1) in 1..10 with 10 for the digit 0); returns (N, 3, 32, 32)
    images and 0..9 labels."""
    import scipy.io

    rng = np.random.default_rng(seed)
    images, digits = _images(rng, n), rng.integers(0, 10, n)
    digits[:2] = 0  # label 10 in the file
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": y})  # (N, C, H, W) -> (H, W, C, N)
    return images, digits.astype(np.int64)


EMNIST_COUNTS = {"balanced": 47, "byclass": 62, "letters": 26, "digits": 10, "mnist": 10}


def write_emnist(path: Path, splits: tuple[str, ...] = ("balanced", "letters"), n: int = 6, seed: int = 0) -> dict:
    """``gzip.zip`` with the gzip IDX files (images stored transposed) and the mapping of each split; returns
    ``{split: {"train": ..., "test": ..., "classes": ...}}`` with upright images and labels from 0."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    with zipfile.ZipFile(path, "w") as z:
        for split in splits:
            count = EMNIST_COUNTS[split]
            first = 1 if split == "letters" else 0
            codes = [[65 + k, 97 + k] for k in range(count)] if split == "letters" else [[48 + k] for k in range(count)]
            z.writestr(f"gzip/emnist-{split}-mapping.txt",
                       "".join(f"{first + k} {' '.join(map(str, c))}\n" for k, c in enumerate(codes)))  # fmt: skip
            names = ["/".join(chr(x) for x in c) for c in codes]
            result: dict = {"classes": names}
            for part in ("train", "test"):
                upright = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
                labels = rng.integers(0, count, n)
                stored = np.ascontiguousarray(upright.transpose(0, 2, 1))
                for kind, array in (("images-idx3", stored), ("labels-idx1", (labels + first).astype(np.uint8))):
                    z.writestr(f"gzip/emnist-{split}-{part}-{kind}-ubyte.gz", gzip.compress(encode_idx(array)))
                result[part] = (upright[:, None], labels.astype(np.int64))
            out[split] = result
    return out
