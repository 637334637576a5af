"""CIFAR end to end on small synthetic archives in the official layout: the cifar preset's 3-epoch smoke run,
``vitbn train --dataset cifar10 --model vitbn --epochs 1 --train-subset 2000`` from a local copy in VITBN_DATA, and
an ``npz:`` file of 32x32 RGB images with the CIFAR model settings. The mean and std recorded in the model file are
those of the training images."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from official_layouts import CIFAR10_NAMES, write_cifar10
from vitbn.cli import main
from vitbn.data import REGISTRY, RemoteFile, md5sum
from vitbn.engine import fit
from vitbn.engine.checkpoint import load_inference
from vitbn.experiments.presets import PRESETS, load_preset, override_preset

TINY = {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "mlp_dim": 32}


@pytest.fixture
def cifar_copy(tmp_path, monkeypatch) -> dict:
    """A synthetic cifar-10-binary.tar.gz (5 x 30 training, 20 test images) in a temporary VITBN_DATA, with the
    registry expecting its MD5 (the official one would refuse it)."""
    root = tmp_path / "data"
    path = root / "cifar10" / "cifar-10-binary.tar.gz"
    expected = write_cifar10(path, per_batch=30, n_test=20, seed=5)
    spec = REGISTRY["cifar10"]
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(spec, files=(RemoteFile(path.name, md5sum(path)),)))
    monkeypatch.setenv("VITBN_DATA", str(root))
    monkeypatch.chdir(tmp_path)
    return expected


def train_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pixels = images.astype(np.float64) / 255
    return pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))


def check_recorded_input(model_file: Path, expected: dict) -> None:
    model, spec = load_inference(model_file)
    c = model.config
    assert (c.channels, c.image_size, c.patch_size, c.num_patches) == (3, 32, 4, 64)
    assert spec.dataset == "cifar10" and list(spec.classes) == CIFAR10_NAMES
    mean, std = train_stats(expected["train"][0])  # all training images, as for MNIST (not the subset)
    np.testing.assert_allclose(spec.mean, mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(spec.std, std, atol=1e-6, rtol=0)


def test_cifar_preset_smoke_run_of_3_epochs(cifar_copy, tmp_path):
    preset = override_preset(
        load_preset("cifar"),
        epochs=3,
        run={"model": TINY, "train": {"out_dir": str(tmp_path / "runs")}, "track": {"enabled": False}},
    )
    assert [m.name for m in preset.models] == ["vit-cifar", "vitbn-cifar"]
    for spec in preset.models:
        config = preset.base_config(spec, preset.lrs[0], preset.seeds[0])
        assert config.augment.hflip and config.augment.crop_padding == 4 and config.data.val_fraction == 0.1
        result = fit(config, progress="none")
        assert result.status == "finished" and len(result.history) == 3
        assert all(math.isfinite(r["train/loss"]) and 0 <= r["val/acc"] <= 1 for r in result.history)
        assert 0 <= result.final["test/acc"] <= 1
        check_recorded_input(result.out_dir / "model.pt", cifar_copy)


def test_vitbn_train_on_a_local_cifar10_copy(cifar_copy, tmp_path, capsys):
    argv = ["train", "--dataset", "cifar10", "--model", "vitbn", "--epochs", "1", "--train-subset", "2000"]
    assert main([*argv, "--no-track", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "finished after 1 epoch(s)" in out
    (model_file,) = (tmp_path / "runs").glob("*/model.pt")
    check_recorded_input(model_file, cifar_copy)


def test_npz_of_32x32_rgb_images_trains_with_the_cifar_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 50),
        "x_test": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 20),
    }
    np.savez(tmp_path / "photos.npz", **arrays)
    argv = ["train", "--dataset", "npz:photos.npz", "--model", "vit-cifar", "--depth", "1", "--epochs", "1"]
    assert main([*argv, "--augment", "natural-medium", "--no-track", "--progress", "none"]) == 0
    assert "finished after 1 epoch(s)" in capsys.readouterr().out
    (model_file,) = (tmp_path / "runs").glob("*/model.pt")
    model, spec = load_inference(model_file)
    assert (model.config.dim, model.config.channels, model.config.num_patches) == (256, 3, 64)
    mean, _ = train_stats(arrays["x_train"].transpose(0, 3, 1, 2))
    np.testing.assert_allclose(spec.mean, mean, atol=1e-6, rtol=0)


def test_cifar_presets_exist_with_their_budgets():
    assert {"cifar", "cifar-full", "norms-cifar", "norms-cifar-full"} <= set(PRESETS)
    full = PRESETS["cifar-full"].base_config(PRESETS["cifar-full"].models[0])
    assert 200 <= full.train.epochs <= 300 and full.data.train_subset is None
    norms = PRESETS["norms-cifar"]
    assert len(norms.seeds) == 2 and len(norms.lrs) == 3 and len(norms.models) == 6
    for spec in norms.models:
        config = norms.base_config(spec)
        assert config.data.dataset == "cifar10" and config.data.val_fraction and not config.data.test_every_epoch
        assert (config.model.image_size, config.model.patch_size, config.model.channels) == (32, 4, 3)
