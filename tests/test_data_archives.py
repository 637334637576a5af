"""CIFAR-10, CIFAR-100, SVHN and EMNIST: small archives in the official layouts, read back exactly, verified by MD5,
and downloaded from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from official_layouts import write_cifar10, write_cifar100, write_emnist, write_svhn_mat
from vitbn.config import DATASET_INPUTS, ModelConfig
from vitbn.data import REGISTRY, RemoteFile, load_dataset, md5sum
from vitbn.data import archives as readers
from vitbn.data.datasets import ArchiveDataset
from vitbn.errors import UserError


def use_local(monkeypatch, name: str, folder: Path, mirrors: tuple[str, ...] = ()) -> None:
    """Points registry entry ``name`` at the MD5s of the synthetic files in ``folder`` (and at ``mirrors``)."""
    spec = REGISTRY[name]
    files = tuple(RemoteFile(f.name, md5sum(folder / f.name)) for f in spec.files)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, files=files, mirrors=mirrors or spec.mirrors))


def check_split(split, expected) -> None:
    images, labels = expected
    torch.testing.assert_close(split.images, torch.from_numpy(np.ascontiguousarray(images)), rtol=0, atol=0)
    torch.testing.assert_close(split.labels, torch.from_numpy(labels), rtol=0, atol=0)


def check_stats(data, train_images: np.ndarray) -> None:
    """Mean and std per channel on the [0, 1] scale, of the training split, against NumPy in float64."""
    pixels = train_images.astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(data.std, pixels.std(axis=(0, 2, 3)), atol=1e-6, rtol=0)


def test_cifar10_binary_archive_is_read_exactly(tmp_path, monkeypatch):
    expected = write_cifar10(tmp_path / "cifar10" / "cifar-10-binary.tar.gz")
    use_local(monkeypatch, "cifar10", tmp_path / "cifar10")
    data = load_dataset("cifar10", root=tmp_path)
    check_split(data.train, expected["train"])  # batches 1..5 in order
    check_split(data.test, expected["test"])
    assert data.classes == expected["classes"] and data.shape == (3, 32, 32) and data.name == "cifar10"
    check_stats(data, expected["train"][0])


@pytest.mark.parametrize("name", ["cifar100", "cifar100-coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch, name):
    expected = write_cifar100(tmp_path / "cifar100" / "cifar-100-binary.tar.gz")
    use_local(monkeypatch, name, tmp_path / "cifar100")
    data = load_dataset(name, root=tmp_path)
    suffix = "_coarse" if name.endswith("coarse") else ""
    check_split(data.train, expected[f"train{suffix}"])
    check_split(data.test, expected[f"test{suffix}"])
    assert data.classes == expected["coarse_classes" if suffix else "classes"]
    check_stats(data, expected["train"][0])


def test_svhn_mat_files_and_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_SVHN_CHUNK", 3)  # the chunked transposition crosses chunk borders
    folder = tmp_path / "svhn"
    train = write_svhn_mat(folder / "train_32x32.mat", 7, seed=1)
    test = write_svhn_mat(folder / "test_32x32.mat", 5, seed=2)
    extra = write_svhn_mat(folder / "extra_32x32.mat", 4, seed=3)
    use_local(monkeypatch, "svhn", folder)
    data = load_dataset("svhn", root=tmp_path)
    check_split(data.train, train)  # label 10 in the file is the digit 0
    check_split(data.test, test)
    assert data.classes == [str(k) for k in range(10)] and data.shape == (3, 32, 32)
    check_stats(data, train[0])
    use_local(monkeypatch, "svhn-extra", folder)
    both = load_dataset("svhn-extra", root=tmp_path)
    check_split(both.train, tuple(np.concatenate([a, b]) for a, b in zip(train, extra)))
    check_split(both.test, test)


@pytest.mark.parametrize("split", ["balanced", "letters"])
def test_emnist_split_from_the_zip(tmp_path, monkeypatch, split):
    expected = write_emnist(tmp_path / "emnist" / "gzip.zip", splits=("balanced", "letters"))[split]
    use_local(monkeypatch, f"emnist-{split}", tmp_path / "emnist")
    data = load_dataset(f"emnist-{split}", root=tmp_path)
    check_split(data.train, expected["train"])  # upright, labels from 0 (letters are stored as 1..26)
    check_split(data.test, expected["test"])
    assert data.classes == expected["classes"] and data.shape == (1, 28, 28)
    assert data.classes[0] == ("A/a" if split == "letters" else "0")


def test_official_md5_refuses_another_archive_in_one_line(tmp_path):
    path = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    write_cifar10(path)
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", root=tmp_path)  # the registry's official MD5, a synthetic archive
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"MD5 mismatch for {path}: expected c32a1d4ab5d03f1284b67883e8d87530, got {md5sum(path)}")
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written beside it


def test_layout_errors_name_the_member(tmp_path, monkeypatch):
    path = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:  # a record one byte short in data_batch_1, the rest missing
        (tmp_path / "b1").write_bytes(b"\0" * 3072)
        tar.add(tmp_path / "b1", "cifar-10-batches-bin/data_batch_1.bin")
    use_local(monkeypatch, "cifar10", path.parent)
    with pytest.raises(UserError, match=r"member\(s\) cifar-10-batches-bin/data_batch_2.bin, .* missing"):
        load_dataset("cifar10", root=tmp_path)
    write_cifar10(path)
    records = path.read_bytes()
    path.write_bytes(records[: len(records) // 2])  # truncated gzip stream
    use_local(monkeypatch, "cifar10", path.parent)
    with pytest.raises(UserError, match=f"{path}: cannot read the tar.gz archive"):
        load_dataset("cifar10", root=tmp_path)


def test_svhn_label_out_of_range_is_refused(tmp_path, monkeypatch):
    import scipy.io

    folder = tmp_path / "svhn"
    write_svhn_mat(folder / "test_32x32.mat", 3)
    x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    scipy.io.savemat(folder / "train_32x32.mat", {"X": x, "y": np.array([[3], [11]], dtype=np.uint8)})
    use_local(monkeypatch, "svhn", folder)
    with pytest.raises(UserError, match=r"train_32x32.mat: label 10 is outside the class range 0..9"):
        load_dataset("svhn", root=tmp_path)
    scipy.io.savemat(folder / "train_32x32.mat", {"X": np.zeros((28, 28, 2), dtype=np.uint8), "y": np.ones((2, 1))})
    use_local(monkeypatch, "svhn", folder)
    with pytest.raises(UserError, match=r"train_32x32.mat: X has shape \(28, 28, 2\); expected \(32, 32, 3, N\)"):
        load_dataset("svhn", root=tmp_path)


def test_download_from_a_local_server(tmp_path, server, monkeypatch):
    base, requests, www = server
    expected = write_cifar100(www / "kriz" / "cifar-100-binary.tar.gz")
    write_emnist(www / "emnist" / "gzip.zip", splits=("digits",))
    svhn_test = write_svhn_mat(www / "svhn" / "test_32x32.mat", 3, seed=4)
    write_svhn_mat(www / "svhn" / "train_32x32.mat", 5, seed=5)
    use_local(monkeypatch, "cifar100", www / "kriz", (f"{base}/kriz/",))
    use_local(monkeypatch, "emnist-digits", www / "emnist", (f"{base}/emnist",))
    use_local(monkeypatch, "svhn", www / "svhn", (f"{base}/svhn/",))
    root = tmp_path / "data"
    data = load_dataset("cifar100", root=root)
    check_split(data.train, expected["train"])
    assert requests == ["/kriz/cifar-100-binary.tar.gz"]
    assert [p.name for p in (root / "cifar100").iterdir()] == ["cifar-100-binary.tar.gz"]  # no temporary file
    assert load_dataset("emnist-digits", root=root).num_classes == 10
    check_split(load_dataset("svhn", root=root).test, svhn_test)
    assert sorted(p.name for p in (root / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
    requests.clear()
    load_dataset("cifar100", root=root)  # local and verified now
    assert requests == []


def test_corrupt_download_is_reported_and_nothing_written(tmp_path, server, monkeypatch):
    base, requests, www = server
    good = www / "good" / "cifar-10-binary.tar.gz"
    write_cifar10(good)
    bad = www / "bad" / good.name
    bad.parent.mkdir()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    use_local(monkeypatch, "cifar10", good.parent, (f"{base}/bad/",))
    root = tmp_path / "data"
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", root=root)
    message = str(info.value)
    assert "\n" not in message and f"expected {md5sum(good)}, got {md5sum(bad)} (deleted)" in message
    assert str(root / "cifar10" / good.name) in message
    assert not root.exists()


def test_registry_shapes_match_the_model_inputs():
    """Every archive dataset's (C, H, W) and class count are those a model takes on it (config.DATASET_INPUTS)."""
    archives = {name: spec for name, spec in REGISTRY.items() if isinstance(spec, ArchiveDataset)}
    assert set(archives) == set(DATASET_INPUTS)
    for name, spec in archives.items():
        config = ModelConfig.from_preset("vit", **DATASET_INPUTS[name])
        assert spec.shape == (config.channels, config.image_size, config.image_size)
        assert spec.num_classes == config.num_classes
