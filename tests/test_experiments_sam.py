"""``vitbn experiment sam``: the preset's plan (Adam against Adam + SAM on ViT and ViTBN, same lr, epochs and
seed), and a tiny run through the CLI whose report analyses each model and reads training and analysis back."""

from __future__ import annotations

import json

import pytest
import torch

import vitbn.experiments.sam as sam_experiment
from vitbn.analysis.activity import active_fraction
from vitbn.analysis.run import AnalyzeOptions, analysis_data, train_batches
from vitbn.cli import main
from vitbn.engine.checkpoint import load_inference
from vitbn.experiments.presets import load_preset
from vitbn.experiments.runs import child_runs, mlflow_client

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
TINY = AnalyzeOptions(images=64, batch_size=32, max_iter=4, block_max_iter=2, attention_images=2, landscape_points=3)


def test_sam_preset_pairs_adam_and_sam_at_equal_settings():
    for name, epochs in (("sam", 15), ("sam-full", 30)):
        preset = load_preset(name)
        assert [m.label for m in preset.models] == ["vit-adam", "vit-sam", "vitbn-adam", "vitbn-sam"]
        configs = {m.label: preset.base_config(m, lr=preset.lrs[0]) for m in preset.models}
        assert {c.model.depth for c in configs.values()} == {6} and len(preset.lrs) == 1
        assert [configs[lb].train.sam_rho for lb in configs] == [None, 0.05, None, 0.05]
        assert {(c.train.lr, c.train.epochs, c.train.optimizer) for c in configs.values()} == {
            (preset.lrs[0], epochs, "adam")
        }


def _cells(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in report.splitlines() if line.startswith("| ViT")]
    return {f"{r[0].strip()} {r[1].strip()}": [c.strip() for c in r] for r in rows}


def test_sam_run_analyses_each_model_and_reports_it(tmp_path, monkeypatch, capsys, data_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sam_experiment, "ANALYSIS", TINY)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "sam", "--models", "vit-adam", "vit-sam", "vitbn-sam", "--train-subset", "200",
            "--test-subset", "100", "--epochs", "1", "--max-steps", "2", "--dim", "16", "--heads", "2",
            "--dim-head", "8", "--mlp-dim", "32", "--threads", "1", "--tracking-uri", uri, "--progress", "none",
            "--report-dir", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "3 trained, 0 resumed, 0 already done" in captured.out
    warned = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert warned and all(w.startswith("vitbn experiment sam: warning: lambda_max of ") for w in warned)  # caps of 2
    client = mlflow_client(uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("vitbn.role") == "parent"]  # fmt: skip
    kids = {r.data.tags["vitbn.label"]: r for r in child_runs(client, parent.info.run_id, parent.info.experiment_id)}
    rho = {label: run.data.params["train.sam_rho"] for label, run in kids.items()}
    assert rho == {"vit-adam": "None", "vit-sam": "0.05", "vitbn-sam": "0.05"}

    report = (tmp_path / "report" / "report.md").read_text()
    assert "Made by `vitbn experiment sam" in report and "--images 64 --max-iter 4" in report
    assert "after the last epoch (one seed)" in report
    cells = _cells(report)
    assert set(cells) == {"ViT (LN) Adam", "ViT (LN) Adam + SAM ρ=0.05", "ViTBN Adam + SAM ρ=0.05"}
    for label, key in (("vit-adam", "ViT (LN) Adam"), ("vitbn-sam", "ViTBN Adam + SAM ρ=0.05")):
        run = kids[label]
        row = cells[key]
        assert row[2] == f"{100 * run.data.metrics['test/acc']:.2f}%"
        assert row[3] == f"{run.data.metrics['train/loss']:.4f}"
        folder = tmp_path / run.data.params["train.out_dir"] / run.info.run_name
        result = json.loads((folder / "analysis" / "analysis.json").read_text())
        assert row[5].rstrip("*") == f"{result['hessian']['lambda_max']:.3g}"
        assert row[8] == f"{result['hessian']['blocks']['block1.mlp']['lambda_max']:.3g}"
        logged = client.get_run(run.info.run_id).data.metrics
        assert logged["analysis/lambda_max"] == pytest.approx(result["hessian"]["lambda_max"])
        # The active fraction of block 1, computed here on the same images: the table's cell.
        model, spec = load_inference(folder / "model.pt")
        data = analysis_data(model, "mnist", TINY, str(data_root))
        direct = active_fraction(model, train_batches(data.train, TINY, spec.mean, spec.std, torch.device("cpu")))
        assert row[9] == f"{direct['block1']:.3f}"
        assert row[10] == f"{sum(direct.values()) / len(direct):.3f}"
    assert (tmp_path / "report" / "sam_attention.png").stat().st_size > 5000

    json_file = next(tmp_path.glob("runs/*/*vit-adam*/analysis/analysis.json"))
    stamp = json_file.stat().st_mtime_ns
    assert main(argv) == 0  # every child done: the report is rebuilt from the kept analyses
    assert "0 trained, 0 resumed, 3 already done" in capsys.readouterr().out
    assert json_file.stat().st_mtime_ns == stamp
    assert _cells((tmp_path / "report" / "report.md").read_text()) == cells


def test_a_missing_model_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sam_experiment, "ANALYSIS", TINY)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "sam", "--models", "vit-adam", "--train-subset", "100", "--test-subset", "50", "--epochs",
            "1", "--max-steps", "1", "--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32",
            "--threads", "1", "--tracking-uri", uri, "--progress", "none"]  # fmt: skip
    assert main(argv) == 0
    (model_file,) = tmp_path.glob("runs/*/*/model.pt")
    model_file.unlink()
    capsys.readouterr()
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("vitbn experiment: error: run sweep-vit-adam")
    assert "has no model file" in errors[0] and errors[0].endswith("from the folder it was trained in)")
