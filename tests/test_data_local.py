"""npz:, folder: and digits datasets on files the tests make; statistics and the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitbn.config import DataConfig
from vitbn.data import Split, channel_stats, load_dataset, prepare_data, split_validation
from vitbn.errors import UserError


def ref_stats(images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of (N, H, W, C) uint8 images on the [0, 1] scale."""
    pixels = images_nhwc.reshape(-1, images_nhwc.shape[-1]).astype(np.float64) / 255
    return pixels.mean(axis=0), pixels.std(axis=0)


def save_npz(path: Path, x_train, y_train, x_test, y_test, **extra) -> str:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return f"npz:{path}"


@pytest.mark.parametrize(("hw", "channels"), [((6, 6), None), ((5, 7), 3), ((4, 9), 1)], ids=["gray-hw", "rgb", "hwc1"])
def test_npz_gray_and_rgb_non_square(tmp_path, hw, channels):
    rng = np.random.default_rng(1)
    shape = hw if channels is None else (*hw, channels)
    x_train, x_test = (
        rng.integers(0, 256, (20, *shape), dtype=np.uint8),
        rng.integers(0, 256, (6, *shape), dtype=np.uint8),
    )
    y_train, y_test = rng.integers(0, 4, 20), rng.integers(0, 4, 6)
    y_train[0] = 3  # the classes are 0..3
    data = load_dataset(save_npz(tmp_path / "d.npz", x_train, y_train, x_test, y_test))
    nhwc = x_train if channels else x_train[..., None]
    c = nhwc.shape[-1]
    assert data.shape == (c, *hw) and data.train.images.shape == (20, c, *hw) and data.test.images.dtype == torch.uint8
    torch.testing.assert_close(data.train.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    torch.testing.assert_close(data.test.labels, torch.from_numpy(y_test).long())
    assert data.classes == ["0", "1", "2", "3"]
    mean, std = ref_stats(nhwc)
    np.testing.assert_allclose(data.mean, mean, atol=1e-6)
    np.testing.assert_allclose(data.std, std, atol=1e-6)


def test_npz_float_images_and_class_names(tmp_path):
    x = np.linspace(0, 1, 4 * 3 * 2).reshape(4, 3, 2)
    name = save_npz(
        tmp_path / "f.npz", x, np.array([0, 1, 1, 0]), x[:2], np.array([1, 1]), classes=np.array(["cat", "dog"])
    )
    data = load_dataset(name)
    assert data.classes == ["cat", "dog"] and data.name == name
    torch.testing.assert_close(data.train.images[:, 0], torch.from_numpy(np.rint(x * 255).astype(np.uint8)))


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (dict(y_test=None), r"missing array\(s\) y_test; found x_train, y_train, x_test"),
        (dict(y_train=np.zeros(4, int)), r"x_train/y_train: 5 images but 4 labels"),
        (dict(y_test=np.array([0, -1])), r"y_test: label -1 is outside the class range 0\.\.0"),
        (
            dict(y_test=np.array([0, 2]), classes=np.array(["a", "b"])),
            r"y_test: label 2 is outside the class range 0\.\.1",
        ),
        (dict(x_train=np.full((5, 3, 3), 300)), r"x_train: images of type int64 in \[300, 300\]; expected uint8"),
        (dict(x_test=np.zeros((2, 3, 4), np.uint8)), r"train images are \(1, 3, 3\) \(C, H, W\) but test images are"),
        (dict(x_train=np.zeros((5, 3), np.uint8)), r"x_train: images of shape \(5, 3\); expected \(N, H, W\)"),
        (dict(y_train=np.zeros((5, 1), int)), r"labels must be a 1-D integer array, got shape \(5, 1\)"),
    ],
    ids=["missing-key", "count", "negative-label", "label-vs-classes", "pixel-range", "shape", "ndim", "label-shape"],
)
def test_npz_bad_input(tmp_path, arrays, match):
    base = dict(x_train=np.zeros((5, 3, 3), np.uint8), y_train=np.zeros(5, int), x_test=np.zeros((2, 3, 3), np.uint8))
    base["y_test"] = np.zeros(2, int)
    base.update(arrays)
    base = {key: value for key, value in base.items() if value is not None}
    np.savez(tmp_path / "bad.npz", **base)
    with pytest.raises(UserError, match=r"bad\.npz.*" + match):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_unreadable_or_missing_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match=r"junk\.npz: not a readable \.npz file"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(UserError, match=r"none\.npz: file not found"):
        load_dataset(f"npz:{tmp_path / 'none.npz'}")


def write_images(folder: Path, images: dict[str, list[np.ndarray]], suffix: str = ".png") -> None:
    for cls, arrays in images.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(folder / cls / f"{i:03d}{suffix}")


@pytest.fixture
def rng():
    return np.random.default_rng(2)


def test_folder_grayscale_non_square(tmp_path, rng):
    train = {c: [rng.integers(0, 256, (5, 7), dtype=np.uint8) for _ in range(3)] for c in ("zebra", "ant", "moth")}
    test = {
        "ant": [rng.integers(0, 256, (5, 7), dtype=np.uint8)],
        "zebra": [rng.integers(0, 256, (5, 7), dtype=np.uint8)],
    }
    write_images(tmp_path / "train", train)
    write_images(tmp_path / "test", test)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    data = load_dataset(f"folder:{tmp_path}")
    assert data.classes == ["ant", "moth", "zebra"] and data.shape == (1, 5, 7)
    expected = np.stack([im for c in data.classes for im in train[c]])[:, None]  # sorted classes, sorted files
    torch.testing.assert_close(data.train.images, torch.from_numpy(expected))
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and data.test.labels.tolist() == [0, 2]
    mean, std = ref_stats(expected.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(data.mean, mean, atol=1e-6)
    np.testing.assert_allclose(data.std, std, atol=1e-6)


def test_folder_rgb_with_some_gray_and_jpeg(tmp_path, rng):
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    write_images(tmp_path / "train", {"a": [rgb], "b": [gray]})
    write_images(tmp_path / "test", {"a": [rgb]}, suffix=".jpg")
    data = load_dataset(f"folder:{tmp_path}")
    assert data.shape == (3, 4, 6) and data.test.images.shape == (1, 3, 4, 6) and len(data.mean) == 3
    torch.testing.assert_close(data.train.images[0], torch.from_numpy(rgb).permute(2, 0, 1))
    torch.testing.assert_close(data.train.images[1], torch.from_numpy(gray)[None].expand(3, 4, 6))  # gray -> RGB


def test_folder_unreadable_image(tmp_path, rng):
    write_images(tmp_path / "train", {"a": [rng.integers(0, 256, (4, 4), dtype=np.uint8)]})
    write_images(tmp_path / "test", {"a": [rng.integers(0, 256, (4, 4), dtype=np.uint8)]})
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=r"train/a/broken\.png: unreadable image"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (
            {"train/a": (4, 4), "train/b": (4, 5), "test/a": (4, 4)},
            r"train/b/000\.png: image is 5x4 \(WxH\), expected 4x4",
        ),
        ({"train/a": (4, 4), "test/c": (4, 4)}, r"test: class folder\(s\) c have no counterpart in train/"),
        ({"train/a": (4, 4)}, r"test: missing folder"),
        (
            {"train/a": (4, 4), "test/a": (3, 3)},
            r"train images are \(1, 4, 4\) \(C, H, W\) but test images are \(1, 3, 3\)",
        ),
    ],
    ids=["size", "extra-class", "no-test", "train-vs-test"],
)
def test_folder_bad_layout(tmp_path, rng, layout, match):
    for folder, hw in layout.items():
        part, cls = folder.split("/")
        write_images(tmp_path / part, {cls: [rng.integers(0, 256, hw, dtype=np.uint8)]})
    with pytest.raises(UserError, match=match):
        load_dataset(f"folder:{tmp_path}")


def test_digits_fixed_split():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert (len(data.train), len(data.test), data.shape) == (1500, 297, (1, 8, 8))
    assert data.classes == [str(k) for k in range(10)] and int(data.train.images.max()) == 255
    digits = load_digits()
    expected = np.rint(digits.images[1500:] * 255 / 16).astype(np.uint8)
    torch.testing.assert_close(data.test.images[:, 0], torch.from_numpy(expected))
    assert data.train.labels.tolist() == digits.target[:1500].tolist()
    mean, std = ref_stats(data.train.images.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(data.mean, mean, atol=1e-6)
    np.testing.assert_allclose(data.std, std, atol=1e-6)


def test_channel_stats_rgb_and_constant_channel(rng):
    images = torch.from_numpy(rng.integers(0, 256, (9000, 3, 2, 2), dtype=np.uint8))  # > one 4096-image chunk
    images[:, 2] = 77
    mean, std = channel_stats(images)
    ref_mean, ref_std = ref_stats(images.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)
    np.testing.assert_allclose(std[:2], ref_std[:2], atol=1e-6)
    assert std[2] == 1.0  # a constant channel must not divide by zero


def make_split(n: int) -> Split:
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1)
    return Split(images, torch.arange(n, dtype=torch.int64))


def test_split_validation_is_a_seeded_partition():
    split = make_split(50)
    train, val = split_validation(split, 10, seed=4)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(50))
    assert train.labels.tolist() == sorted(train.labels.tolist())  # original order kept
    torch.testing.assert_close(train.images[:, 0, 0, 0].long(), train.labels)  # images follow their labels
    assert split_validation(split, 10, seed=4)[1].labels.tolist() == val.labels.tolist()
    assert split_validation(split, 10, seed=5)[1].labels.tolist() != val.labels.tolist()
    assert len(split_validation(split, 0, seed=0)[1]) == 0
    with pytest.raises(UserError, match=r"val_size=50 must be >= 0 and < the 50 training images"):
        split_validation(split, 50, seed=0)


def test_prepare_data_on_npz(tmp_path):
    x = np.arange(30 * 4, dtype=np.uint8).reshape(30, 2, 2)
    name = save_npz(tmp_path / "p.npz", x, np.arange(30) % 3, x[:10], np.arange(10) % 3)
    data = prepare_data(DataConfig(dataset=name, train_subset=20, test_subset=4, val_size=5, split_seed=1))
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 4)
    firsts = sorted(torch.cat([data.train.images, data.val.images])[:, 0, 0, 0].tolist())
    assert firsts == list(range(0, 80, 4))  # exactly the first 20 training images
    with pytest.raises(UserError, match=r"val_size=20 must be >= 0 and < the 20 training images"):
        prepare_data(DataConfig(dataset=name, train_subset=20, val_size=20))


def test_split_rejects_wrong_types():
    with pytest.raises(ValueError, match=r"Split.images must be a \(N, C, H, W\) uint8 tensor"):
        Split(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"Split has 2 images but 3 labels"):
        Split(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
