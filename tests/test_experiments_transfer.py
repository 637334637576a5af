"""``vitbn experiment transfer``: the target runs' configs, and a tiny run through the CLI (pre-training on MNIST,
then scikit-learn's digits from scratch and fine-tuned) whose report reads the measurements back."""

from __future__ import annotations

import pytest

from vitbn.cli import main
from vitbn.experiments.presets import load_preset
from vitbn.experiments.runs import child_runs, mlflow_client
from vitbn.experiments.transfer import MODES, PLANS, target_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_target_configs_move_the_run_to_the_target():
    preset = load_preset("transfer")
    plan = PLANS["transfer"]
    spec = preset.models[1]
    pre = preset.base_config(spec, lr=preset.lrs[0], seed=0)
    assert (pre.data.dataset, pre.data.train_subset, pre.model.name, pre.model.depth) == ("mnist", 10000, "vitbn", 3)
    scratch = target_config(preset, spec, "digits", "scratch", plan, 0)
    assert (scratch.data.dataset, scratch.data.train_subset, scratch.data.val_fraction) == ("digits", None, 0.1)
    assert (scratch.train.epochs, scratch.model.image_size, scratch.augment.enabled) == (15, 28, False)
    augreg = target_config(preset, spec, "digits", "scratch+augreg", plan, 0)
    assert (augreg.augment.level, augreg.model.dropout, augreg.model.drop_path) == ("light", 0.1, 0.1)
    assert PLANS["transfer-full"].target_subset == 5000 and "kmnist" in PLANS["transfer-full"].targets


def test_transfer_run_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(PLANS, "transfer", PLANS["transfer"].__class__(epochs=2))
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "transfer", "--models", "vitbn-d3", "--train-subset", "200", "--test-subset", "100",
            "--epochs", "1", "--max-steps", "2", "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32",
            "--threads", "1", "--tracking-uri", uri, "--progress", "none",
            "--report-dir", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 0
    assert f"{1 + len(MODES)} trained, 0 resumed, 0 already done" in capsys.readouterr().out
    client = mlflow_client(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("vitbn.role") == "parent"]  # fmt: skip
    kids = {r.data.tags["vitbn.label"]: r for r in child_runs(client, parent.info.run_id, parent.info.experiment_id)}
    attn, everything = kids["vitbn-d3-digits-attn"].data, kids["vitbn-d3-digits-all"].data
    assert attn.params["finetune.part"] == "attn" and attn.params["data.dataset"] == "digits"
    assert attn.metrics["finetune/trainable_params"] < everything.metrics["finetune/trainable_params"]
    assert "finetune.part" not in kids["vitbn-d3-digits-scratch"].data.params
    report = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| vitbn | digits | attn |"))
    cells = row.strip("|").split(" | ")
    assert cells[4] == f"{100 * attn.metrics['best/test_acc']:.2f}%"
    assert cells[6] == f"{int(attn.metrics['finetune/trainable_params']):,}"
    assert cells[9].startswith(f"{attn.metrics['finetune/delta_mb']:.3f} / ")
    assert "attention-only" in report and (tmp_path / "r" / "transfer.png").stat().st_size > 1000
    assert main(argv) == 0  # a second run finds every child done
    assert f"0 trained, 0 resumed, {1 + len(MODES)} already done" in capsys.readouterr().out
