"""Model selection on a validation split: the stratified split, the best epoch (best.pt, best/test_acc) and early
stopping."""

from __future__ import annotations

import math

import pytest
import torch

from vitbn.config import DataConfig, RunConfig
from vitbn.data import InMemoryLoader, Split, prepare_data, split_stratified
from vitbn.engine import evaluate, fit, load_model
from vitbn.engine.checkpoint import MODEL_NAME
from vitbn.engine.selection import BEST_NAME, Selection
from vitbn.errors import UserError
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)


def _labels_split(counts: list[int]) -> Split:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).reshape(-1, 1, 1, 1)  # image i holds its index (mod 256)
    return Split(images.expand(-1, 1, 2, 2).contiguous(), labels[torch.randperm(len(labels))])


def test_stratified_split_holds_out_the_fraction_of_every_class():
    split = _labels_split([100, 50, 20, 10])
    train, val = split_stratified(split, 0.2, seed=3)
    assert torch.bincount(val.labels).tolist() == [20, 10, 4, 2]
    assert torch.bincount(train.labels).tolist() == [80, 40, 16, 8]
    # disjoint, together the whole split, each keeping the original order
    rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(split.images, split.labels)}
    parts = [tuple(x.flatten().tolist()) + (int(y),) for s in (train, val) for x, y in zip(s.images, s.labels)]
    assert len(parts) == len(split) and set(parts) <= rows
    again_train, again_val = split_stratified(split, 0.2, seed=3)
    assert torch.equal(again_val.labels, val.labels) and torch.equal(again_val.images, val.images)
    other_val = split_stratified(split, 0.2, seed=4)[1]
    assert not torch.equal(other_val.images, val.images)


def test_stratified_split_errors():
    with pytest.raises(ValueError, match=r"val_fraction=0.6 must be in \(0, 0.5\]"):
        DataConfig(val_fraction=0.6)
    with pytest.raises(ValueError, match="val_size=100 and val_fraction=0.1 both set"):
        DataConfig(val_size=100, val_fraction=0.1)
    with pytest.raises(UserError, match="holds out no image of class 1 \\(2 image\\(s\\)\\)"):
        split_stratified(_labels_split([100, 2]), 0.1, seed=0)


def test_prepare_data_uses_the_fraction_on_mnist():
    data = prepare_data(DataConfig(train_subset=1000, test_subset=10, val_fraction=0.1))
    counts = torch.bincount(prepare_data(DataConfig(train_subset=1000)).train.labels, minlength=10)
    assert torch.bincount(data.val.labels, minlength=10).tolist() == [round(0.1 * int(n)) for n in counts]
    assert len(data.train) + len(data.val) == 1000


def test_selection_keeps_the_first_best_and_counts_patience():
    history = [{"epoch": 1, "val/acc": 0.5}, {"epoch": 2, "val/acc": 0.7}, {"epoch": 3, "val/acc": 0.7},
               {"epoch": 4, "val/acc": 0.6}]  # fmt: skip
    sel = Selection.from_history(history, patience=2)
    assert (sel.best_epoch, sel.best_acc, sel.should_stop) == (2, 0.7, True)
    assert sel.metrics() == {"best/epoch": 2.0, "best/val_acc": 0.7}
    assert not Selection.from_history(history[:3], patience=2).should_stop
    assert not Selection.from_history(history, patience=None).should_stop
    assert Selection.from_history([{"epoch": 1, "val/acc": math.nan}], 1).metrics() == {}


def _config(tmp_path, **train) -> RunConfig:
    train = {"epochs": 3, "batch_size": 40, "eval_batch_size": 100, "lr": 2e-3, "device": "cpu", "threads": 1,
             "out_dir": str(tmp_path), **train}  # fmt: skip
    data = {"train_subset": 240, "test_subset": 100, "val_fraction": 0.25, "test_every_epoch": False}
    return RunConfig.from_dict({"model": {"name": "vit", **TINY}, "data": data, "train": train,
                                "track": {"enabled": False, "run_name": "run"}})  # fmt: skip


def _prefer_epoch_one(monkeypatch):
    """Validation 'chooses' epoch 1 whatever the accuracies: the later epochs are never better."""
    original = Selection.update

    def update(self, record):
        improved = original(self, record)
        if record["epoch"] > 1:
            self.best_epoch, self.best_acc = 1, math.inf
            return False
        return improved

    monkeypatch.setattr(Selection, "update", update)


def test_the_best_epoch_is_kept_and_its_test_accuracy_reported(tmp_path, monkeypatch):
    _prefer_epoch_one(monkeypatch)
    tracker = MemoryTracker()
    result = fit(_config(tmp_path), tracker=tracker, progress="none")
    assert result.status == "finished" and len(result.history) == 3
    best = load_model(result.out_dir / BEST_NAME)
    saved = torch.load(result.out_dir / BEST_NAME, weights_only=True)
    assert saved["meta"]["best/epoch"] == 1.0
    data = prepare_data(_config(tmp_path).data)
    loader = InMemoryLoader(data.test, batch_size=100, mean=data.info.mean, std=data.info.std)
    expected = evaluate(best, loader, device="cpu", num_classes=10)["acc"]
    assert result.final["best/test_acc"] == expected and result.final["best/epoch"] == 1.0
    assert tracker.run.metrics["best/test_acc"] == [(3, expected)]
    # the last weights are back in the returned model, and they are model.pt's
    torch.testing.assert_close(result.model.state_dict(), load_model(result.out_dir / MODEL_NAME).state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), result.model.state_dict().values()))
    assert {p.name for p, _ in tracker.run.artifacts} >= {MODEL_NAME, BEST_NAME}


def test_early_stopping_ends_the_run_after_patience_epochs(tmp_path, monkeypatch):
    _prefer_epoch_one(monkeypatch)
    tracker = MemoryTracker()
    result = fit(_config(tmp_path, epochs=6, early_stopping=2), tracker=tracker, progress="none")
    assert result.status == "finished" and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert tracker.run.tags["vitbn.stopped_early"] == "3" and tracker.run.tags["vitbn.status"] == "finished"
    assert "test/acc" in result.final


def test_early_stopping_needs_a_validation_split(tmp_path):
    cfg = _config(tmp_path, early_stopping=2)
    cfg.data.val_fraction = None
    with pytest.raises(UserError, match="early_stopping needs a validation split"):
        fit(cfg, tracker=MemoryTracker(), progress="none")
    with pytest.raises(ValueError, match="early_stopping=0 must be a positive integer"):
        RunConfig.from_dict({"train": {"early_stopping": 0}})
