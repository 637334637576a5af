"""The real MNIST in ../shared/data/mnist (read-only: nothing here writes there), the registry and the data root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from vitbn.config import DataConfig
from vitbn.data import REGISTRY, Dataset, channel_stats, data_root, load_dataset, md5sum, prepare_data
from vitbn.errors import UserError

# From ../shared/data/mnist/README.md (the official digests).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    """MNIST loaded once for the module, from $VITBN_DATA (set by conftest), without downloading."""
    root = Path(os.environ["VITBN_DATA"])
    if not (root / "mnist").is_dir():
        pytest.fail(f"MNIST not found under {root}; set VITBN_DATA to a folder with mnist/")
    return load_dataset("mnist", root=root, download=False)


def test_official_checksums(data_root):
    assert {f.name: f.md5 for f in REGISTRY["mnist"].files} == MNIST_MD5
    for name, md5 in MNIST_MD5.items():
        assert md5sum(data_root / "mnist" / name) == md5


def test_sizes_shapes_and_types(mnist):
    assert mnist.name == "mnist" and mnist.shape == (1, 28, 28)
    assert mnist.train.images.shape == (60000, 1, 28, 28) and mnist.test.images.shape == (10000, 1, 28, 28)
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.labels.dtype == torch.int64
    assert mnist.test.labels.shape == (10000,) and len(mnist.train) == 60000
    assert int(mnist.train.images.max()) == 255 and int(mnist.train.images.min()) == 0


def test_label_counts_and_first_labels(mnist):
    assert torch.bincount(mnist.train.labels, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.test.labels, minlength=10).sum() == 10000
    # The well-known first images: a 5 in train, a 7 in test.
    assert int(mnist.train.labels[0]) == 5 and int(mnist.test.labels[0]) == 7


def test_classes_and_normalization_constants(mnist):
    assert mnist.classes == [str(k) for k in range(10)] and mnist.num_classes == 10
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    mean, std = channel_stats(mnist.train.images)  # the constants are the training set's statistics
    assert mean[0] == pytest.approx(0.1307, abs=5e-5) and std[0] == pytest.approx(0.3081, abs=5e-5)
    reference = mnist.train.images[:2000].double() / 255  # exact formula on a slice
    sub_mean, sub_std = channel_stats(mnist.train.images[:2000])
    assert sub_mean[0] == pytest.approx(reference.mean().item(), abs=1e-6)
    assert sub_std[0] == pytest.approx(reference.std(unbiased=False).item(), abs=1e-6)


def test_prepare_data_subsets_then_validation_split(mnist):
    cfg = DataConfig(dataset="mnist", train_subset=1000, test_subset=300, val_size=200, split_seed=3)
    data = prepare_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (800, 200, 300)
    torch.testing.assert_close(data.test.images, mnist.test.images[:300])
    # train and val partition the first 1000 training images: every image once.
    first = mnist.train.images[:1000].reshape(1000, -1)
    both = torch.cat([data.train.images, data.val.images]).reshape(1000, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, first.numpy()))
    assert data.classes == mnist.classes and data.mean == (0.1307,) and data.shape == (1, 28, 28)
    assert prepare_data(DataConfig(dataset="mnist", test_subset=20000)).val is None


def test_local_file_failing_md5_is_reported_not_used(tmp_path, data_root):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_MD5:
        if name != "train-labels-idx1-ubyte.gz":
            shutil.copy(data_root / "mnist" / name, folder / name)
    bad = folder / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not the labels")
    expected = r"MD5 mismatch for .*train-labels-idx1-ubyte\.gz: expected d53e105ee54ea40749a09fcbcd1e9432, got "
    with pytest.raises(UserError, match=expected + md5sum(bad)):
        load_dataset("mnist", root=tmp_path)
    assert bad.read_bytes() == b"not the labels"  # neither deleted nor replaced
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_MD5)


def test_missing_files_without_download_name_files_and_folder(tmp_path):
    with pytest.raises(
        UserError, match=r"download=False: put train-images-idx3-ubyte\.gz, .*t10k-labels-idx1-ubyte\.gz "
    ):
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    with pytest.raises(UserError, match=r"in " + str(tmp_path / "kmnist") + r"/ \(download them from https://codh"):
        load_dataset("kmnist", root=tmp_path, download=False)
    assert list(tmp_path.iterdir()) == []


def test_registered_family():
    assert REGISTRY["fashion-mnist"].classes[:2] == ("T-shirt/top", "Trouser") and len(REGISTRY["kmnist"].classes) == 10
    assert (REGISTRY["fashion-mnist"].mean, REGISTRY["fashion-mnist"].std) == ((0.2860,), (0.3530,))
    assert (REGISTRY["kmnist"].mean, REGISTRY["kmnist"].std) == ((0.1918,), (0.3483,))


def test_unknown_dataset():
    with pytest.raises(
        UserError,
        match=r"unknown dataset 'mnits'; known: cifar10, cifar100, cifar100-coarse, digits, emnist-balanced, "
        r"emnist-byclass, emnist-digits, emnist-letters, emnist-mnist, fashion-mnist, kmnist, mnist, svhn, "
        r"svhn-extra, or npz:PATH, folder:PATH$",
    ):
        load_dataset("mnits")


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("VITBN_DATA", str(tmp_path / "env"))
    assert data_root("/x/y") == Path("/x/y")
    assert data_root() == tmp_path / "env"
    monkeypatch.setenv("VITBN_DATA", "")  # empty counts as unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "vitbn"
    monkeypatch.delenv("VITBN_DATA")
    assert data_root(None) == tmp_path / "home" / ".cache" / "vitbn"
