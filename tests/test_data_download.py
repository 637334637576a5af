"""Downloads against a real HTTP server on 127.0.0.1, and a small fake IDX dataset in the registry."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from vitbn.data import REGISTRY, IDXDataset, RemoteFile, load_dataset, md5sum, register_dataset, write_idx
from vitbn.errors import UserError

NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
NAMES += ("t10k-labels-idx1-ubyte.gz",)


def make_idx_files(folder: Path, n_train: int = 12, n_test: int = 5, n_labels: int | None = None, top: int = 3):
    """Writes a fake dataset of (N, 5, 7) images; returns the arrays by file name."""
    rng = np.random.default_rng(0)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (n_train, 5, 7), dtype=np.uint8),
        NAMES[1]: rng.integers(0, top, n_train if n_labels is None else n_labels, dtype=np.uint8),
        NAMES[2]: rng.integers(0, 256, (n_test, 5, 7), dtype=np.uint8),
        NAMES[3]: rng.integers(0, top, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array)
    return arrays


def fake_spec(folder: Path, mirrors: tuple[str, ...], name: str = "fake") -> IDXDataset:
    """A registry entry for the files in ``folder``, with their MD5s."""
    files = [RemoteFile(n, md5sum(folder / n)) for n in NAMES]
    return IDXDataset(name, *files, mirrors=mirrors, classes=("a", "b", "c"))


@pytest.fixture
def dead_mirror() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture
def mirrors(server, dead_mirror):
    """good/ holds the files, bad/ corrupted copies (one byte flipped), missing/ nothing (HTTP 404)."""
    base, requests, www = server
    arrays = make_idx_files(www / "good")
    (www / "bad").mkdir()
    for name in NAMES:
        data = bytearray((www / "good" / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (www / "bad" / name).write_bytes(bytes(data))
    urls = {"dead": dead_mirror, "missing": f"{base}/missing/", "bad": f"{base}/bad/", "good": f"{base}/good"}
    return urls, requests, www, arrays


def test_download_skips_dead_and_corrupt_mirrors(tmp_path, mirrors, monkeypatch):
    urls, requests, www, arrays = mirrors
    spec = fake_spec(www / "good", (urls["dead"], urls["missing"], urls["bad"], urls["good"]))
    monkeypatch.setitem(REGISTRY, "fake", spec)
    root = tmp_path / "data"
    data = load_dataset("fake", root=root)
    for name in NAMES:  # each file: 404, then the corrupt copy (rejected), then the good one
        assert requests.count(f"/missing/{name}") == 1 and requests.count(f"/bad/{name}") == 1
        assert requests.count(f"/good/{name}") == 1
        assert md5sum(root / "fake" / name) == md5sum(www / "good" / name)
    assert sorted(p.name for p in (root / "fake").iterdir()) == sorted(NAMES)  # no temporary files
    torch.testing.assert_close(data.train.images, torch.from_numpy(arrays[NAMES[0]]).unsqueeze(1))
    torch.testing.assert_close(data.test.labels, torch.from_numpy(arrays[NAMES[3]]).long())
    assert data.shape == (1, 5, 7) and data.classes == ["a", "b", "c"] and data.name == "fake"
    pixels = arrays[NAMES[0]].astype(np.float64) / 255  # no registered mean/std: from the training images
    assert data.mean[0] == pytest.approx(pixels.mean(), abs=1e-6) and data.std[0] == pytest.approx(
        pixels.std(), abs=1e-6
    )
    requests.clear()
    load_dataset("fake", root=root)  # now local and verified: no request
    assert requests == []


def test_corrupt_download_is_deleted_and_reported(tmp_path, mirrors, monkeypatch):
    urls, requests, www, _ = mirrors
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(www / "good", (urls["bad"],)))
    root = tmp_path / "data"
    good, bad = md5sum(www / "good" / NAMES[0]), md5sum(www / "bad" / NAMES[0])
    expected = rf"MD5 mismatch for {root / 'fake' / NAMES[0]}: expected {good}, got {bad} \(deleted\)"
    with pytest.raises(UserError, match=expected):
        load_dataset("fake", root=root)
    assert not root.exists()  # no file, no temporary file, not even the folder it made


def test_all_mirrors_down_lists_files_and_where_to_put_them(tmp_path, mirrors, monkeypatch):
    urls, requests, www, _ = mirrors
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(www / "good", (urls["dead"], urls["missing"])))
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as info:
        load_dataset("fake", root=tmp_path / "data")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {', '.join(NAMES)} ({urls['dead']}: ")
    assert f"{urls['missing']}: HTTP 404 File not found for t10k-labels-idx1-ubyte.gz" in message
    assert message.endswith(
        f"put {', '.join(NAMES)} in {tmp_path / 'data' / 'fake'}/ (download them from "
        f"{urls['dead']} or {urls['missing']}) or set VITBN_DATA / the root to a folder that has them"
    )
    assert list((tmp_path / "data").iterdir()) == []
    assert len(requests) == 4  # the refused mirror is tried once, not once per file


def test_only_missing_files_are_downloaded(tmp_path, mirrors, monkeypatch):
    urls, requests, www, _ = mirrors
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(www / "good", (urls["good"],)))
    local = tmp_path / "data" / "fake"
    local.mkdir(parents=True)
    for name in NAMES[:3]:
        (local / name).write_bytes((www / "good" / name).read_bytes())
    load_dataset("fake", root=tmp_path / "data")
    assert requests == [f"/good/{NAMES[3]}"]


def test_image_and_label_counts_disagree(tmp_path, monkeypatch):
    make_idx_files(tmp_path / "fake", n_labels=11)
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(tmp_path / "fake", ()))
    with pytest.raises(
        UserError, match=r"train-images-idx3-ubyte\.gz has 12 images but .*train-labels-idx1-ubyte\.gz has 11"
    ):
        load_dataset("fake", root=tmp_path)


def test_labels_outside_class_range(tmp_path, monkeypatch):
    make_idx_files(tmp_path / "fake", top=5)  # labels 0..4 for 3 classes
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(tmp_path / "fake", ()))
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte\.gz: label [34] is outside the class range 0\.\.2"):
        load_dataset("fake", root=tmp_path)


def test_truncated_file_with_matching_md5_names_the_file(tmp_path, monkeypatch):
    make_idx_files(tmp_path / "fake")
    path = tmp_path / "fake" / NAMES[2]
    path.write_bytes(path.read_bytes()[:-20])
    monkeypatch.setitem(REGISTRY, "fake", fake_spec(tmp_path / "fake", ()))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte\.gz: truncated gzip file"):
        load_dataset("fake", root=tmp_path)


def test_register_dataset_checks_names(tmp_path, monkeypatch):
    make_idx_files(tmp_path / "fake")
    spec = fake_spec(tmp_path / "fake", ())
    monkeypatch.setitem(REGISTRY, "fake", spec)
    with pytest.raises(ValueError, match=r"dataset 'fake' is already registered; pass replace=True"):
        register_dataset(spec)
    assert register_dataset(spec, replace=True) is REGISTRY["fake"]
    with pytest.raises(ValueError, match=r"dataset name 'npz:x' is not allowed"):
        register_dataset(fake_spec(tmp_path / "fake", (), name="npz:x"))
