"""The dataset registry and ``load_dataset`` / ``prepare_data``.

Registered IDX datasets (MNIST, Fashion-MNIST, KMNIST, and any added with ``register_dataset``) live in
``<root>/<name>/`` under their official file names; missing files are downloaded from the mirrors and every file is
MD5-verified before use. Archive datasets (CIFAR-10, CIFAR-100 fine and coarse, SVHN with and without ``extra``,
the EMNIST splits) work the same way with their official archives in ``<root>/<folder>/`` (one folder per archive,
shared by the datasets read from it), parsed by ``vitbn.data.archives``. ``root`` is the argument, else
``$VITBN_DATA`` (an empty value counts as unset), else ``~/.cache/vitbn``. Besides the registry: ``digits``
(scikit-learn's bundled 8x8 digits), ``npz:PATH`` and ``folder:PATH``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vitbn.config import DATASET_INPUTS, DataConfig
from vitbn.data import archives
from vitbn.data.base import (
    Dataset,
    PreparedData,
    Split,
    channel_stats,
    check_labels,
    split_stratified,
    split_validation,
)
from vitbn.data.download import RemoteFile, ensure_files
from vitbn.data.idx import read_idx
from vitbn.data.local import load_digits_dataset, load_folder, load_npz
from vitbn.errors import UserError

DEFAULT_ROOT = "~/.cache/vitbn"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag")
FASHION_CLASSES += ("Ankle boot",)
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # romanized Kuzushiji hiragana


@dataclass(frozen=True)
class IDXDataset:
    """A dataset of four IDX files (train/test images (N, H, W) uint8, labels (N,) uint8) with known MD5s."""

    name: str
    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile
    mirrors: tuple[str, ...]  # base URLs, tried in order
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None = None  # None: computed from the training images
    std: tuple[float, ...] | None = None

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def _mnist_layout(md5s: tuple[str, str, str, str]) -> dict[str, RemoteFile]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    names += ("t10k-labels-idx1-ubyte.gz",)
    roles = ("train_images", "train_labels", "test_images", "test_labels")
    return {role: RemoteFile(name, md5) for role, name, md5 in zip(roles, names, md5s)}


@dataclass(frozen=True)
class ArchiveDataset:
    """A dataset read from official archive files with known MD5s by a ``vitbn.data.archives`` reader."""

    name: str
    folder: str  # under the data root; the datasets of one archive share it (cifar100 and cifar100-coarse)
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order
    reader: Callable[
        [dict[str, Path]], tuple[Split, Split, list[str]]
    ]  # verified paths by name -> train, test, classes
    shape: tuple[int, int, int]  # (C, H, W) every image must have
    num_classes: int


REGISTRY: dict[str, IDXDataset | ArchiveDataset] = {}


def register_dataset(spec: IDXDataset | ArchiveDataset, *, replace: bool = False) -> IDXDataset | ArchiveDataset:
    """Adds an IDX or archive dataset to the registry (``load_dataset(spec.name)`` then finds it).

    Raises:
        ValueError: The name contains ``:`` (reserved for ``npz:``/``folder:``), is ``digits``, or is already
            registered and ``replace`` is False.
    """
    if not spec.name or ":" in spec.name or spec.name == "digits":
        raise ValueError(f"dataset name {spec.name!r} is not allowed (empty, contains ':' or is 'digits')")
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"dataset {spec.name!r} is already registered; pass replace=True to replace it")
    REGISTRY[spec.name] = spec
    return spec


register_dataset(
    IDXDataset(
        name="mnist",
        **_mnist_layout(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            )
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(k) for k in range(10)),
        mean=(0.1307,),
        std=(0.3081,),
    )
)
register_dataset(
    IDXDataset(
        name="fashion-mnist",
        **_mnist_layout(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        classes=FASHION_CLASSES,
        mean=(0.2860,),
        std=(0.3530,),
    )
)
register_dataset(
    IDXDataset(
        name="kmnist",
        **_mnist_layout(
            (
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            )
        ),
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist/", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
        classes=KMNIST_CLASSES,
        mean=(0.1918,),
        std=(0.3483,),
    )
)


_CIFAR = ("https://www.cs.toronto.edu/~kriz/",)
_SVHN = ("http://ufldl.stanford.edu/housenumbers/",)
_SVHN_FILES = {
    "train": RemoteFile("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": RemoteFile("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
    "extra": RemoteFile("extra_32x32.mat", "a93ce644f1a588dc4d68dda5feec44a7"),
}
_CIFAR10 = RemoteFile("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")
_CIFAR100 = RemoteFile("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8")
_EMNIST = RemoteFile("gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e")
EMNIST_SPLITS = {"balanced": 47, "byclass": 62, "letters": 26, "digits": 10, "mnist": 10}  # split -> classes


Reader = Callable[[dict[str, Path]], tuple[Split, Split, list[str]]]


def _archive(name: str, folder: str, files: tuple[RemoteFile, ...], mirrors: tuple[str, ...], reader: Reader) -> None:
    """Registers an archive dataset whose shape and class count are those of ``DATASET_INPUTS[name]``."""
    inputs = DATASET_INPUTS[name]  # the model input a preset takes on this dataset (vitbn.config)
    side = inputs.get("image_size", 28)
    shape = (inputs.get("channels", 1), side, side)
    register_dataset(ArchiveDataset(name, folder, files, mirrors, reader, shape, inputs["num_classes"]))


_archive("cifar10", "cifar10", (_CIFAR10,), _CIFAR, archives.read_cifar10)
_archive("cifar100", "cifar100", (_CIFAR100,), _CIFAR, archives.read_cifar100)
_archive("cifar100-coarse", "cifar100", (_CIFAR100,), _CIFAR, archives.read_cifar100_coarse)
_archive("svhn", "svhn", (_SVHN_FILES["train"], _SVHN_FILES["test"]), _SVHN, archives.read_svhn)
_archive("svhn-extra", "svhn", tuple(_SVHN_FILES.values()), _SVHN, archives.read_svhn_extra)


def _read_emnist(paths: dict[str, Path], split: str, count: int) -> tuple[Split, Split, list[str]]:
    return archives.read_emnist(paths[_EMNIST.name], split, count)


for _split, _count in EMNIST_SPLITS.items():
    _reader = functools.partial(_read_emnist, split=_split, count=_count)
    _archive(f"emnist-{_split}", "emnist", (_EMNIST,), ("https://biometrics.nist.gov/cs_links/EMNIST/",), _reader)


def list_datasets() -> list[str]:
    """The names ``load_dataset`` accepts (besides ``npz:PATH`` and ``folder:PATH``)."""
    return sorted([*REGISTRY, "digits"])


def data_root(root: str | Path | None = None) -> Path:
    """The data folder: ``root``, else ``$VITBN_DATA`` (empty = unset), else ``~/.cache/vitbn``."""
    if root is None or str(root) == "":
        root = os.environ.get("VITBN_DATA") or DEFAULT_ROOT
    return Path(root).expanduser()


def _idx_split(images_path: Path, labels_path: Path, num_classes: int) -> Split:
    images = read_idx(images_path, ndim=3, dtype="uint8")  # (N, H, W)
    labels = read_idx(labels_path, ndim=1, dtype="uint8")  # (N,)
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    check_labels(labels, num_classes, str(labels_path))
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")))


def load_idx_dataset(spec: IDXDataset, root: str | Path | None = None, download: bool = True) -> Dataset:
    """Loads a registered IDX dataset from ``<root>/<name>/``, downloading and verifying its files first."""
    paths = ensure_files(spec.files, data_root(root) / spec.name, spec.mirrors, download=download)
    num_classes = len(spec.classes)
    train = _idx_split(paths[spec.train_images.name], paths[spec.train_labels.name], num_classes)
    test = _idx_split(paths[spec.test_images.name], paths[spec.test_labels.name], num_classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(
            f"{paths[spec.test_images.name]}: test images are {tuple(test.images.shape[2:])}, "
            f"train images {tuple(train.images.shape[2:])}"
        )
    if spec.mean is not None and spec.std is not None:
        mean, std = tuple(spec.mean), tuple(spec.std)
    else:
        mean, std = channel_stats(train.images)
    c, h, w = train.images.shape[1:]
    return Dataset(spec.name, train, test, list(spec.classes), mean, std, (c, h, w))


def load_archive_dataset(spec: ArchiveDataset, root: str | Path | None = None, download: bool = True) -> Dataset:
    """Loads an archive dataset from ``<root>/<folder>/``, downloading and verifying its files first; mean and std
    are computed on the training split."""
    paths = ensure_files(spec.files, data_root(root) / spec.folder, spec.mirrors, download=download)
    train, test, classes = spec.reader(paths)
    source = ", ".join(str(p) for p in paths.values())
    for split_name, split in (("train", train), ("test", test)):
        if tuple(split.images.shape[1:]) != spec.shape:
            got = tuple(split.images.shape[1:])
            raise UserError(f"{source}: {split_name} images are {got} (C, H, W), {spec.name} has {spec.shape}")
    if len(train) == 0:
        raise UserError(f"{source}: the training split of {spec.name} is empty")
    mean, std = channel_stats(train.images)
    return Dataset(spec.name, train, test, list(classes), mean, std, spec.shape)


def load_dataset(name: str, root: str | Path | None = None, download: bool = True) -> Dataset:
    """Loads a dataset into memory.

    Args:
        name: A registered name (``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``, ``cifar100``,
            ``cifar100-coarse``, ``svhn``, ``svhn-extra``, ``emnist-<split>``, ...), ``digits``, ``npz:PATH`` or
            ``folder:PATH`` (PATH relative to the working directory, not to the root).
        root: The data folder for registered datasets; None: ``$VITBN_DATA``, else ``~/.cache/vitbn``.
        download: Download missing files of registered datasets (else they are an error).

    Returns:
        The dataset: uint8 (N, C, H, W) images, int64 labels, class names, per-channel mean/std, (C, H, W).

    Raises:
        UserError: Unknown name, missing or corrupt files, inconsistent images and labels (one line, naming the
            file).
    """
    if name.startswith("npz:"):
        return load_npz(name, name[len("npz:") :])
    if name.startswith("folder:"):
        return load_folder(name, name[len("folder:") :])
    if name == "digits":
        return load_digits_dataset(name)
    if name in REGISTRY:
        spec = REGISTRY[name]
        if isinstance(spec, ArchiveDataset):
            return load_archive_dataset(spec, root, download)
        return load_idx_dataset(spec, root, download)
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}, or npz:PATH, folder:PATH")


def prepare_data(cfg: DataConfig) -> PreparedData:
    """The splits a run uses: the first ``train_subset`` / ``test_subset`` images (all if None or larger), then
    ``val_size`` training images (or ``val_fraction`` of each class) carved out, seeded by ``split_seed``, for
    validation; the test set stays apart."""
    info = load_dataset(cfg.dataset, cfg.root, cfg.download)
    for split, asked in (("train", cfg.train_subset), ("test", cfg.test_subset)):
        held = len(getattr(info, split))
        if asked is not None and asked > held:  # said, not silent: the run's record shows the number asked for
            warnings.warn(f"{split}_subset={asked}: {info.name} has {held} {split} images; using all {held}",
                          stacklevel=2)  # fmt: skip
    train, test = info.train.head(cfg.train_subset), info.test.head(cfg.test_subset)
    val = None
    if cfg.val_fraction:
        train, val = split_stratified(train, cfg.val_fraction, cfg.split_seed)
    elif cfg.val_size:
        train, val = split_validation(train, cfg.val_size, cfg.split_seed)
    return PreparedData(train=train, val=val, test=test, info=info)
