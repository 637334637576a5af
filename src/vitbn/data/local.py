"""Datasets from local files: ``npz:PATH``, ``folder:PATH``, and scikit-learn's bundled 8x8 ``digits``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from vitbn.data.base import Dataset, Split, channel_stats, check_labels
from vitbn.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Modes Pillow reads as one channel; every other mode is converted to RGB.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# digits: the first DIGITS_TRAIN of the 1797 images train, the remaining 297 test (the order of load_digits()).
DIGITS_TRAIN = 1500


def _to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 images from uint8, integers in [0, 255], or floats in [0, 1] (scaled by 255)."""
    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = array.min(), array.max()
    if np.issubdtype(array.dtype, np.integer) and lo >= 0 and hi <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.rint(array * 255.0).astype(np.uint8)
    raise UserError(
        f"{source}: images of type {array.dtype.name} in [{lo}, {hi}]; expected uint8, integers in [0, 255] "
        "or floats in [0, 1]"
    )


def _nchw(images: np.ndarray, source: str) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) images -> (N, C, H, W) uint8 tensor."""
    if images.ndim == 3:
        images = images[:, :, :, None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise UserError(f"{source}: images of shape {images.shape}; expected (N, H, W) or (N, H, W, C), C 1, 3 or 4")
    images = _to_uint8(images, source)
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _labels(labels: np.ndarray, count: int, source: str) -> np.ndarray:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: labels must be a 1-D integer array, got shape {labels.shape} {labels.dtype.name}")
    if len(labels) != count:
        raise UserError(f"{source}: {count} images but {len(labels)} labels")
    return labels.astype(np.int64)


def _make_dataset(name: str, train: Split, test: Split, classes: list[str], source: str) -> Dataset:
    if len(train) == 0:
        raise UserError(f"{source}: the training set is empty")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(
            f"{source}: train images are {tuple(train.images.shape[1:])} (C, H, W) "
            f"but test images are {tuple(test.images.shape[1:])}"
        )
    mean, std = channel_stats(train.images)
    c, h, w = train.images.shape[1:]
    return Dataset(name, train, test, classes, mean, std, (c, h, w))


def load_npz(name: str, path: str | Path) -> Dataset:
    """A dataset from an ``.npz`` file with arrays ``x_train, y_train, x_test, y_test``.

    Images are (N, H, W) or (N, H, W, C) with C 1, 3 or 4, uint8 (or integers in [0, 255], or floats in [0, 1]).
    An optional ``classes`` array of strings names the classes; otherwise they are ``"0"`` to ``"K-1"`` with K the
    largest label + 1. Mean and std are computed from the training images.
    """
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)}; found {', '.join(arrays) or 'none'}")
    splits, labels = {}, {}
    for part in ("train", "test"):
        images = _nchw(arrays[f"x_{part}"], f"{path} x_{part}")
        labels[part] = _labels(arrays[f"y_{part}"], len(images), f"{path} x_{part}/y_{part}")
        splits[part] = images
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].reshape(-1)]
    else:
        classes = [str(k) for k in range(max(int(y.max(initial=-1)) for y in labels.values()) + 1)]
    for part, y in labels.items():
        check_labels(y, len(classes), f"{path} y_{part}")
    train = Split(splits["train"], torch.from_numpy(labels["train"]))
    test = Split(splits["test"], torch.from_numpy(labels["test"]))
    return _make_dataset(name, train, test, classes, str(path))


def _read_image(path: Path) -> np.ndarray:
    """(H, W) for grayscale files, (H, W, 3) otherwise; a one-line UserError for an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("L" if image.mode in GRAY_MODES else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({exc})") from None


def _class_files(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise UserError(f"{folder}: missing folder (a folder dataset needs train/ and test/, one sub-folder per class)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c: sorted((folder / c).iterdir()) for c in classes}
    return {
        c: [p for p in ps if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        for c, ps in files.items()
    }


def _stack(images: list[np.ndarray], files: list[Path], rgb: bool) -> torch.Tensor:
    """Same-size (H, W[, 3]) images -> (N, C, H, W) uint8; grayscale ones are repeated to RGB if ``rgb``."""
    size = images[0].shape[:2]
    for image, file in zip(images, files):
        if image.shape[:2] != size:
            raise UserError(f"{file}: image is {image.shape[1]}x{image.shape[0]} (WxH), expected {size[1]}x{size[0]}")
    if rgb:
        images = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in images]
    else:
        images = [im[:, :, None] for im in images]
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def load_folder(name: str, path: str | Path) -> Dataset:
    """A dataset from ``PATH/train/<class>/*.png|jpg`` and ``PATH/test/<class>/...``, read with Pillow.

    Classes are the sorted sub-folder names of ``train/``; ``test/`` may lack some but not add any. All images must
    have the same size. Grayscale files give one channel; if any file is in colour, all images are RGB. Mean and
    std are computed from the training images.
    """
    root = Path(path).expanduser()
    train_files, test_files = _class_files(root / "train"), _class_files(root / "test")
    classes = list(train_files)
    extra = sorted(set(test_files) - set(train_files))
    if extra:
        raise UserError(f"{root / 'test'}: class folder(s) {', '.join(extra)} have no counterpart in train/")
    parts = {}
    for part, by_class in (("train", train_files), ("test", test_files)):
        files = [f for c in by_class for f in by_class[c]]
        if not files and part == "train":
            raise UserError(f"{root / 'train'}: no .png/.jpg/.jpeg images in any class sub-folder")
        labels = [classes.index(c) for c in by_class for _ in by_class[c]]
        parts[part] = (files, [_read_image(f) for f in files], torch.tensor(labels, dtype=torch.int64))
    rgb = any(im.ndim == 3 for _, images, _ in parts.values() for im in images)
    splits = {}
    for part, (files, images, labels) in parts.items():
        if images:
            x = _stack(images, files, rgb)
        else:
            first = parts["train"][1][0]
            x = torch.zeros(0, 3 if rgb else 1, *first.shape[:2], dtype=torch.uint8)
        splits[part] = Split(x, labels)
    return _make_dataset(name, splits["train"], splits["test"], classes, str(root))


def load_digits_dataset(name: str = "digits") -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255).

    Fixed split: the first 1500 images train, the remaining 297 test, in ``load_digits()`` order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    x, y = torch.from_numpy(images), torch.from_numpy(digits.target.astype(np.int64))
    train = Split(x[:DIGITS_TRAIN].clone(), y[:DIGITS_TRAIN].clone())
    test = Split(x[DIGITS_TRAIN:].clone(), y[DIGITS_TRAIN:].clone())
    return _make_dataset(name, train, test, [str(k) for k in range(10)], "digits")
