"""Augmentation in training: the loader's augmented batches, soft targets in the step, resume, config and flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitbn.cli import build_parser, main
from vitbn.cli.train import config_from_args
from vitbn.config import AugmentConfig, DataConfig, RunConfig
from vitbn.data import InMemoryLoader, prepare_data
from vitbn.data.augment import Augmenter
from vitbn.engine import fit
from vitbn.engine.device import make_amp
from vitbn.engine.step import make_loss, train_step
from vitbn.models import create_model
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)
DATA = dict(train_subset=160, test_subset=80, val_size=40)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(**DATA))


class _Invert:
    """A stand-in augmentation with a known result (1 - x, soft targets 0.91 / 0.01) that records what it got."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __call__(self, x01: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((x01.clone(), labels.clone()))
        return 1.0 - x01, 0.9 * F.one_hot(labels, 10).float() + 0.01


def test_the_loader_augments_in_unit_scale_then_normalizes(data):
    invert = _Invert()
    loader = InMemoryLoader(data.train, batch_size=32, mean=data.info.mean, std=data.info.std, shuffle=True, seed=1,
                            augment=invert)  # fmt: skip
    loader.set_epoch(2)
    x, targets = next(iter(loader))
    index = loader.order()[:32]
    images, labels = data.train.images[index].float(), data.train.labels[index]
    assert invert.epochs == [2]
    (seen_x, seen_labels), *_ = invert.calls
    torch.testing.assert_close(seen_x, images / 255.0)  # the augmentation sees [0, 1] images and the labels
    assert torch.equal(seen_labels, labels)
    mean, std = data.info.mean[0], data.info.std[0]
    torch.testing.assert_close(x, (1.0 - images / 255.0 - mean) / std)  # then the loader normalizes its output
    torch.testing.assert_close(targets, 0.9 * F.one_hot(labels, 10).float() + 0.01)


def test_the_augmenter_in_the_loader_is_seeded_and_changes_the_batch(data):
    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        augment = Augmenter(AugmentConfig.from_level("medium"), num_classes=10, seed=seed)
        loader = InMemoryLoader(data.train, batch_size=32, mean=data.info.mean, std=data.info.std, shuffle=True,
                                seed=1, augment=augment)  # fmt: skip
        loader.set_epoch(2)
        return next(iter(loader))

    (x, targets), (again, _), (other, _) = batch(7), batch(7), batch(8)
    assert torch.equal(x, again) and not torch.allclose(x, other)
    assert targets.shape == (32, 10) and torch.allclose(targets.sum(1), torch.ones(32))
    plain = InMemoryLoader(data.train, batch_size=32, mean=data.info.mean, std=data.info.std, shuffle=True, seed=1)
    plain.set_epoch(2)
    assert not torch.allclose(next(iter(plain))[0], x)


def test_the_step_takes_soft_targets_and_counts_hits_by_their_top_class():
    torch.manual_seed(0)
    model = create_model("vit", **TINY)
    x, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    soft = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(labels.roll(1), 10).float()
    with torch.no_grad():
        logits = model(x)
    expected = F.cross_entropy(logits, soft, label_smoothing=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, hits = train_step(model, x, soft, optimizer, make_loss(0.1), amp=make_amp("fp32", torch.device("cpu")))
    torch.testing.assert_close(loss, expected)
    assert hits == (logits.argmax(-1) == labels).sum()


def _config(tmp_path, name, **train):
    train = {"epochs": 2, "batch_size": 40, "eval_batch_size": 80, "lr": 1e-3, "device": "cpu", "threads": 1,
             "out_dir": str(tmp_path), **train}  # fmt: skip
    return RunConfig.from_dict({"model": {"name": "vit", **TINY}, "data": DATA, "train": train,
                                "augment": {"level": "heavy", "cutmix_alpha": 1.0},
                                "track": {"enabled": False, "run_name": name}})  # fmt: skip


def test_an_augmented_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, data):
    whole = fit(_config(tmp_path, "whole"), tracker=MemoryTracker(), data=data, progress="none")
    assert whole.status == "finished"

    def stop(record):
        raise KeyboardInterrupt

    tracker = MemoryTracker()
    assert (
        fit(_config(tmp_path, "parts"), tracker=tracker, data=data, on_epoch=stop, progress="none").status == "killed"
    )
    resumed = fit(_config(tmp_path, "parts", resume=True), tracker=tracker, data=data, progress="none")
    torch.testing.assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)
    for key in ("train/loss", "train/acc", "val/acc", "test/acc"):
        assert [r[key] for r in resumed.history] == [r[key] for r in whole.history], key
    assert tracker.run.params["augment.level"] == "custom" and tracker.run.params["augment.cutmix_alpha"] == "1.0"


def test_augment_flags_and_config_sections():
    cfg = config_from_args(build_parser().parse_args(["train", "--augment", "light", "--mixup", "0.2"]))
    assert (cfg.augment.level, cfg.augment.crop_padding, cfg.augment.mixup_alpha) == ("custom", 2, 0.2)
    cfg = config_from_args(build_parser().parse_args(["train", "--augment", "medium"]))
    assert cfg.augment == AugmentConfig.from_level("medium") and cfg.augment.level == "medium"
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.augment == cfg.augment  # the level survives the round trip
    assert RunConfig.from_dict({"augment": {"crop_padding": 3}}).augment.level == "custom"
    with pytest.raises(ValueError, match="unknown AugmentConfig field"):
        RunConfig.from_dict({"augment": {"flip": True}})


def test_bad_augment_flags_are_one_line(capsys):
    assert main(["train", "--randaug-magnitude", "31", "--no-track"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--randaug-magnitude: randaug_magnitude=31 must be in [0, 30]" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--augment", "extreme"])
