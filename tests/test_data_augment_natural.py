"""Augmentation for natural images: pad-4 crop and horizontal flip (refused on digits), the natural-* levels on
3-channel batches, and the levels as configuration (no config <-> data.augment import circle)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from vitbn.cli import main
from vitbn.config import GLYPH_DATASETS, AugmentConfig, RunConfig
from vitbn.data import augment as A


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_random_hflip_mirrors_each_sample_or_keeps_it():
    x = rand(200, 3, 6, 5)
    out = A.random_hflip(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())  # every sample exactly one of the two (none is symmetric)
    assert 70 <= int(flipped.sum()) <= 130  # p = 0.5: 100 +- 4.2 sigma
    assert_close(A.random_hflip(x, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)  # seeded


def test_augmenter_applies_the_flip_only_when_asked():
    x, labels = rand(64, 3, 8, 8), torch.arange(64) % 10
    cfg = AugmentConfig(hflip=True, level="custom")
    assert cfg.enabled and not cfg.mixes
    out, targets = A.Augmenter(cfg, num_classes=10)(x, labels)
    flips = sum(torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x))
    assert 0 < flips < 64 and torch.equal(targets, labels)
    out, _ = A.Augmenter(AugmentConfig(crop_padding=0, level="custom", rotate=0.0), num_classes=10)(x, labels)
    assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize("level", ["natural-light", "natural-medium", "natural-heavy"])
def test_natural_levels_on_rgb_batches(level):
    cfg = AugmentConfig.from_level(level)
    assert (cfg.crop_padding, cfg.hflip) == (4, True)
    x, labels = rand(16, 3, 32, 32), torch.arange(16) % 10
    augmenter = A.Augmenter(cfg, num_classes=10, seed=3)
    out, targets = augmenter(x, labels)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    if cfg.mixes:
        assert targets.shape == (16, 10)
        assert_close(targets.sum(1), torch.ones(16))
    augmenter.set_epoch(0)
    again, _ = augmenter(x, labels)
    assert_close(again, out, rtol=0, atol=0)  # reproducible per epoch


def test_cutmix_pastes_all_three_channels():
    b, h, w = 8, 6, 6
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w) / b
    x = x + torch.tensor([0.0, 0.01, 0.02]).view(1, 3, 1, 1)  # channels tell apart
    perm = torch.roll(torch.arange(b), 1)
    boxes = tuple(torch.full((b,), v) for v in (1, 4, 2, 5))  # rows 1..3, cols 2..4
    out, _ = A.cutmix(x, torch.eye(b), perm, boxes)
    assert_close(out[:, :, 1:4, 2:5], x[perm][:, :, 1:4, 2:5], rtol=0, atol=0)
    assert_close(out[:, :, 0], x[:, :, 0], rtol=0, atol=0)


@pytest.mark.parametrize("dataset", ["mnist", "svhn", "emnist-letters", "digits"])
def test_flip_refused_on_digit_datasets(dataset):
    assert dataset in GLYPH_DATASETS
    with pytest.raises(ValueError, match=rf"^hflip on dataset '{dataset}' \(digits or characters\)"):
        RunConfig.from_dict({"data": {"dataset": dataset}, "augment": {"level": "natural-light"}})


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion-mnist", "npz:photos.npz"])
def test_flip_allowed_on_natural_images(dataset):
    config = RunConfig.from_dict({"data": {"dataset": dataset}, "augment": {"hflip": True}})
    assert config.augment.hflip and config.augment.level == "custom"


def test_cli_refuses_the_flip_on_mnist_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-track", "--dataset", "mnist", "--hflip"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hflip on dataset 'mnist' (digits or characters)" in err
    assert list(tmp_path.iterdir()) == []


def test_levels_are_configuration_without_an_import_circle():
    """config.py holds the levels; building one does not import the data package (it used to import
    vitbn.data.augment, which imports config.py)."""
    code = (
        "import sys; from vitbn.config import AugmentConfig; c = AugmentConfig.from_level('medium'); "
        "print(c.randaug_ops, c.mixup_alpha, any(m.startswith('vitbn.data') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "0.2", "False"]
    assert A.LEVELS["medium"]["randaug_ops"] == 2  # still readable where it used to be
