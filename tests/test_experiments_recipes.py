"""``vitbn experiment recipes``: the preset's plan (the recipes as model entries with labels), and a tiny run
through the CLI whose report reads the tracked runs back (accuracy, times, FLOPs, params, batch-1 latency)."""

from __future__ import annotations

import pytest

from vitbn.cli import main
from vitbn.experiments.presets import load_preset
from vitbn.experiments.recipes import RECIPE_NAMES
from vitbn.experiments.runs import child_runs, mlflow_client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_recipes_preset_plans_every_recipe_for_vit_and_vitbn():
    preset = load_preset("recipes")
    labels = [m.label for m in preset.models]
    assert labels == [f"{name}-{recipe}" for name in ("vit", "vitbn") for recipe in RECIPE_NAMES]
    configs = {m.label: preset.base_config(m, lr=preset.lrs[0]).model for m in preset.models}
    assert (configs["vit-par3x2"].depth, configs["vit-par3x2"].parallel) == (3, 2)
    assert configs["vitbn-hmlp4"].stem == "hmlp" and configs["vitbn-hmlp4"].patch_size == 4
    assert configs["vit-linear4"].stem == "linear" and configs["vit-linear4"].patch_size == 4
    assert configs["vit-ls"].layer_scale == 0.1 and configs["vitbn-dp0.1"].drop_path == 0.1
    assert all(c.name in ("vit", "vitbn") for c in configs.values())
    full = load_preset("recipes-full")
    assert [m.label for m in full.models] == labels and full.run["data"].get("train_subset") is None


def test_recipes_run_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "recipes", "--models", "vit-seq6", "vit-par3x2", "vitbn-hmlp4", "--train-subset", "200",
            "--test-subset", "100", "--epochs", "1", "--max-steps", "2", "--dim", "16", "--heads", "2", "--dim-head",
            "8", "--mlp-dim", "32", "--threads", "1", "--tracking-uri", uri, "--progress", "none",
            "--report-dir", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 trained, 0 resumed, 0 already done" in out
    client = mlflow_client(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("vitbn.role") == "parent"]  # fmt: skip
    kids = child_runs(client, parent.info.run_id, parent.info.experiment_id)
    params = {r.data.tags["vitbn.label"]: r.data.params for r in kids}
    assert params["vit-par3x2"]["model.parallel"] == "2" and params["vitbn-hmlp4"]["model.stem"] == "hmlp"

    report = (tmp_path / "report" / "report.md").read_text()
    assert "Made by `vitbn experiment recipes" in report and "runs trained at commit " in report
    rows = [line for line in report.splitlines() if line.startswith("| Vi")]
    assert [r.split(" | ")[1] for r in rows] == ["sequential", "parallel 3x2", "hMLP stem"]
    seq, par, hmlp = (r.strip("|").split(" | ") for r in rows)
    assert (seq[2], par[2], hmlp[3]) == ("6 x 1", "3 x 2", "hmlp / 4")
    assert seq[4] == par[4] and seq[5] == par[5]  # equal parameters and FLOPs
    assert float(hmlp[-1]) > 0 and (tmp_path / "report" / "recipes.png").stat().st_size > 1000
    assert main(argv) == 0  # a second run finds every child done and rebuilds the report
    assert "0 trained, 0 resumed, 3 already done" in capsys.readouterr().out
