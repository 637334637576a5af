"""``vitbn compare`` over real tiny runs, and the curves figure every ``vitbn train`` run writes and logs."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from PIL import Image

from vitbn.cli import main

TINY = ["--dim", "16", "--heads", "2", "--dim-head", "8", "--mlp-dim", "32", "--depth", "1", "--train-subset", "200",
        "--test-subset", "50", "--batch-size", "50", "--threads", "1", "--device", "cpu",
        "--progress", "none"]  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    db = f"sqlite:///{root / 'db.sqlite'}"
    for name, model, epochs in (("a", "vit", "2"), ("b", "vitbn", "3")):
        argv = ["train", "--model", model, *TINY, "--epochs", epochs, "--out-dir", str(root / "runs"),
                "--run-name", name, "--tracking-uri", db, "--experiment", "c"]  # fmt: skip
        assert main(argv) == 0
    return root, db


def test_every_train_run_writes_and_logs_its_curves(two_runs):
    root, db = two_runs
    with Image.open(root / "runs" / "a" / "curves.png") as image:
        assert image.size[0] > 500
    client = MlflowClient(db)
    run = next(r for r in client.search_runs([client.get_experiment_by_name("c").experiment_id])
               if r.info.run_name == "a")  # fmt: skip
    assert "curves.png" in [f.path for f in client.list_artifacts(run.info.run_id)]


def test_compare_tables_the_differences_and_final_metrics(two_runs, capsys, tmp_path):
    root, _ = two_runs
    out = tmp_path / "cmp"
    assert main(["compare", "a", str(root / "runs" / "b"), "--runs-dir", str(root / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    hist = {n: json.loads((root / "runs" / n / "history.json").read_text()) for n in "ab"}
    assert printed[0].split("|")[1:-1] == [
        " run ",
        " epochs ",
        " train loss ",
        " val acc ",
        " test acc ",
        " train s/epoch (median) ",
    ]
    row_b = [c.strip() for c in printed[3].split("|")[1:-1]]
    assert row_b[:5] == ["b", "3", f"{hist['b'][-1]['train/loss']:.4f}", "-", f"{100 * hist['b'][-1]['test/acc']:.2f}%"]
    assert printed[-1] == f"report: {out / 'report.md'} and {out / 'report.html'}"
    md = (out / "report.md").read_text()
    assert "| model.name | vit | vitbn |" in md and "| train.epochs | 2 | 3 |" in md
    assert "| model.dim |" not in md  # the same in both: not a difference
    assert (out / "curves.png").is_file() and "data:image/png;base64," in (out / "report.html").read_text()


def test_compare_needs_two_runs_that_exist(two_runs, capsys):
    root, _ = two_runs
    runs = str(root / "runs")
    assert main(["compare", "a", "nope", "--runs-dir", runs]) == 2
    assert capsys.readouterr().err == (
        f"vitbn compare: error: no run 'nope': neither a run folder nor a run under {runs}/ (a folder with "
        "history.json)\n"
    )
    assert main(["compare", "a", "a", "--runs-dir", runs]) == 2
    assert "compare needs two or more different runs" in capsys.readouterr().err
