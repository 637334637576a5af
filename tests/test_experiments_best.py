"""``vitbn experiment best``: the preset's recipe, and the report's selection, wall-clock and target verdict from a
hand-made run set, and the demo's default model kept by validation accuracy."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from vitbn.cli import main
from vitbn.errors import UserError
from vitbn.experiments.best import TARGET, best_table, verdict
from vitbn.experiments.presets import load_preset
from vitbn.experiments.runs import child_runs, mlflow_client
from vitbn.serve.predictor import find_study_models, keep_for_demo


def test_best_preset_turns_every_recipe_on_and_selects_on_val():
    preset = load_preset("best")
    assert [m.label for m in preset.models] == ["vit-best", "vitbn-best"] and preset.lrs == [0.001]
    for spec in preset.models:
        c = preset.base_config(spec, lr=preset.lrs[0], seed=0)
        assert (c.model.depth, c.model.parallel, c.model.drop_path, c.model.patch_size) == (3, 2, 0.1, 7)
        assert (c.train.optimizer, c.train.schedule, c.train.warmup_epochs, c.train.label_smoothing) == (
            "adamw", "cosine", 2.0, 0.1)  # fmt: skip
        assert (c.augment.crop_padding, c.augment.rotate, c.augment.mixup_alpha) == (2, 10.0, 0.0)
        assert (c.data.val_fraction, c.data.test_every_epoch, c.train.epochs, c.train.lr) == (0.1, False, 20, 0.001)
    full = load_preset("best-full").base_config(preset.models[0])
    assert (full.train.epochs, full.train.precision) == (100, "bf16")


def test_best_table_reads_the_chosen_epoch_and_sums_wall_clock_up_to_it():
    runs = pd.DataFrame([
        {"run_id": "a", "label": "vit-best", "model": "vit", "status": "finished", "params": 1000, "final_acc": 0.990},
        {"run_id": "b", "label": "vitbn-best", "model": "vitbn", "status": "diverged", "params": 1000,
         "final_acc": math.nan},
    ])  # fmt: skip
    history = pd.DataFrame({"run_id": ["a"] * 3 + ["b"], "epoch": [1, 2, 3, 1], "train_s": [10.0, 11.0, 12.0, 9.0],
                            "val_time_s": [1.0, 1.0, 1.0, 1.0], "val_acc": [0.9, 0.99, 0.98, 0.5],
                            "train_loss": [1.0, 0.5, 0.4, 9.0]})  # fmt: skip
    best = {"a": {"best/epoch": 2.0, "best/val_acc": 0.99, "best/test_acc": 0.996}}
    table = best_table(runs, history, best, {"a": 300.0})
    assert table["label"].tolist() == ["vit-best"]  # the diverged run is left out
    row = table.iloc[0]
    assert (row["epochs"], row["best_epoch"], row["test_acc"], row["last_test_acc"]) == (3, 2.0, 0.996, 0.990)
    assert row["to_chosen_s"] == pytest.approx(23.0) and row["total_s"] == pytest.approx(36.0)
    assert row["img_s"] == 300.0


def test_target_verdict():
    assert verdict(TARGET) == "met" and verdict(0.9934) == "NOT met (-0.16 points)" and verdict(math.nan) == "-"


def _selected(path, name: str, val_acc: float | None, dataset: str = "mnist"):
    meta = {} if val_acc is None else {"best/epoch": 3.0, "best/val_acc": val_acc}
    torch.save({"config": {"name": name}, "state_dict": {}, "data": {"dataset": dataset}, "meta": meta}, path)
    return path


def test_the_demo_keeps_the_checkpoint_best_on_validation(tmp_path):
    runs = tmp_path / "runs"
    (runs / "study" / "r1").mkdir(parents=True)
    newest = _selected(runs / "study" / "r1" / "model.pt", "vit", None)
    assert find_study_models(runs) == [newest]  # nothing kept: the newest model file
    first = keep_for_demo(_selected(tmp_path / "a.pt", "vit", 0.98), runs)
    assert first == runs / "demo" / "vit.pt" and find_study_models(runs) == [first]
    assert keep_for_demo(_selected(tmp_path / "b.pt", "vit", 0.97), runs) is None  # worse on val: kept as it was
    assert torch.load(first, weights_only=True)["meta"]["best/val_acc"] == 0.98
    assert keep_for_demo(_selected(tmp_path / "c.pt", "vit", 0.99), runs) == first
    assert torch.load(first, weights_only=True)["meta"]["best/val_acc"] == 0.99
    assert not list((runs / "demo").glob("*.tmp"))
    for bad in (_selected(tmp_path / "d.pt", "vit", None), _selected(tmp_path / "e.pt", "vit", 0.999, "digits")):
        with pytest.raises(UserError, match="not a checkpoint selected on an MNIST validation split"):
            keep_for_demo(bad, runs)
    assert torch.load(first, weights_only=True)["meta"]["best/val_acc"] == 0.99


def test_experiment_best_trains_reports_and_keeps_the_selected_checkpoints(tmp_path, data_root, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "runs"
    argv = ["experiment", "best", "--train-subset", "400", "--test-subset", "100", "--epochs", "2",
            "--max-steps", "2", "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32", "--threads", "1",
            "--data-root", str(data_root), "--out-dir", str(out), "--tracking-uri", uri, "--progress", "none",
            "--report-dir", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 trained, 0 resumed, 0 already done" in printed
    assert f"vitbn-best: the demo's default is now {out / 'demo' / 'vitbn.pt'}" in printed
    client = mlflow_client(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("vitbn.role") == "parent"]  # fmt: skip
    kids = {
        r.data.tags["vitbn.label"]: r.data for r in child_runs(client, parent.info.run_id, parent.info.experiment_id)
    }
    report = (tmp_path / "report" / "report.md").read_text()
    for label, data in kids.items():
        cells = next(line for line in report.splitlines() if line.startswith(f"| {label} |")).strip("|").split(" | ")
        assert (
            cells[3] == f"{data.metrics['best/epoch']:.0f}"
            and cells[5] == f"{100 * data.metrics['best/test_acc']:.2f}%"
        )
        kept = torch.load(out / "demo" / f"{label.split('-')[0]}.pt", weights_only=True)
        assert kept["meta"]["best/val_acc"] == pytest.approx(data.metrics["best/val_acc"])
    assert find_study_models(out) == [out / "demo" / "vit.pt", out / "demo" / "vitbn.pt"]
    assert main(argv) == 0  # again: everything done, and the kept models are as good: unchanged
    assert "vit-best: the demo keeps its default" in capsys.readouterr().out
