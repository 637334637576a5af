"""``vitbn experiment augreg``: the preset's cells, the report's gains, selection and verdicts from a hand-made run
set, and a tiny run through the CLI whose report reads the best-epoch metrics back."""

from __future__ import annotations

import pandas as pd
import pytest

from vitbn.cli import main
from vitbn.experiments.augreg import cells_table, selected, verdicts
from vitbn.experiments.presets import load_preset
from vitbn.experiments.runs import child_runs, mlflow_client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_augreg_preset_crosses_sizes_levels_and_regularization():
    preset = load_preset("augreg")
    labels = [m.label for m in preset.models]
    assert len(labels) == 32 and labels[:3] == ["vit-1k-none-reg0", "vit-1k-none-reg0.1", "vit-1k-light-reg0"]
    configs = {m.label: preset.base_config(m, lr=preset.lrs[0]) for m in preset.models}
    heavy = configs["vitbn-10k-heavy-reg0.1"]
    assert (heavy.augment.level, heavy.augment.randaug_ops, heavy.augment.randaug_magnitude) == ("heavy", 2, 15)
    assert (heavy.model.dropout, heavy.model.drop_path, heavy.model.depth, heavy.model.name) == (0.1, 0.1, 3, "vitbn")
    assert (heavy.data.train_subset, heavy.data.val_fraction, heavy.train.epochs) == (10000, 0.1, 4)
    plain = configs["vit-1k-none-reg0"]
    assert (plain.augment.enabled, plain.model.dropout, plain.train.epochs, plain.data.train_subset) == (
        False, 0.0, 20, 1000)  # fmt: skip
    assert all(c.train.optimizer == "adamw" and c.train.weight_decay == 0.05 for c in configs.values())
    assert len(load_preset("augreg-full").models) == 48


def _runs() -> tuple[pd.DataFrame, dict]:
    cells = [("vit-1k-none-reg0", 0.90, 0.80), ("vit-1k-none-reg0.1", 0.91, 0.81), ("vit-1k-light-reg0", 0.93, 0.85),
             ("vit-1k-heavy-reg0", 0.92, 0.83), ("vit-1k-heavy-reg0.1", 0.95, 0.70)]  # fmt: skip
    runs = pd.DataFrame([{"run_id": f"r{i}", "label": label, "model": "vit", "status": "finished"}
                         for i, (label, _, _) in enumerate(cells)])  # fmt: skip
    best = {f"r{i}": {"best/epoch": 3.0, "best/val_acc": val, "best/test_acc": test}
            for i, (_, val, test) in enumerate(cells)}  # fmt: skip
    return runs, best


def test_gains_selection_and_verdicts():
    runs, best = _runs()
    history = pd.DataFrame({"run_id": ["r0"] * 3, "epoch": [1, 2, 3], "train_s": [9.0, 2.0, 4.0]})
    table = cells_table(runs, history, best)
    assert list(table["level"]) == ["none", "none", "light", "heavy", "heavy"]
    assert table["gain"].round(6).tolist() == [0.0, 1.0, 5.0, 3.0, -10.0]
    assert table.loc[0, "t_train"] == 3.0  # median of epochs 2 and 3
    (pick,) = selected(table).itertuples()
    assert (pick.level, pick.reg, pick.test_acc) == ("heavy", "reg0.1", 0.70)  # chosen by val, even if test is worse
    (line,) = verdicts(table)
    assert line.startswith("vit, 1k images: augmentation alone +4.00 points on average (best: light, +5.00), "
                           "regularization alone +1.00: augmentation helps more")  # fmt: skip


def test_augreg_run_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "augreg", "--models", "vit-1k-none-reg0", "vit-1k-heavy-reg0.1", "vitbn-1k-medium-reg0",
            "--test-subset", "100", "--max-steps", "1", "--dim", "16", "--heads", "2", "--dim-head", "8",
            "--mlp-dim", "32", "--threads", "1", "--tracking-uri", uri, "--progress", "none",
            "--report-dir", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    assert "3 trained, 0 resumed, 0 already done" in capsys.readouterr().out
    client = mlflow_client(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("vitbn.role") == "parent"]  # fmt: skip
    kids = {r.data.tags["vitbn.label"]: r for r in child_runs(client, parent.info.run_id, parent.info.experiment_id)}
    heavy = kids["vit-1k-heavy-reg0.1"].data
    assert heavy.params["augment.level"] == "heavy" and heavy.params["model.drop_path"] == "0.1"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Made by `vitbn experiment augreg" in report
    row = next(line for line in report.splitlines() if line.startswith("| vit | 1k | heavy |"))
    cells = row.strip("|").split(" | ")
    assert cells[6] == f"{100 * heavy.metrics['best/test_acc']:.2f}%"
    assert cells[4] == f"{heavy.metrics['best/epoch']:.0f}"
    assert (tmp_path / "report" / "augreg.png").stat().st_size > 1000
