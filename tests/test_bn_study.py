"""The BN consistency study on a tiny model and tiny MNIST subsets: rows, reference errors, files, CLI."""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch
from torch import nn

import vitbn.bn.study as study
from vitbn.bn import recompute_bn_stats
from vitbn.cli import main
from vitbn.data import InMemoryLoader, load_dataset
from vitbn.engine.checkpoint import export_model, load_model
from vitbn.errors import UserError
from vitbn.models import TokenBatchNorm, create_model
from vitbn.models.norms import prepbn_state
from vitbn.tracking import MemoryTracker

TINY = dict(dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32)
NBS = [2, 8, 32]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models run fastest on one thread; two threads on a loaded 2-core machine mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    info = load_dataset("mnist", os.environ["VITBN_DATA"], download=False)
    return info.train.head(192), info.test.head(96), info.mean, info.std


@pytest.fixture(scope="module")
def trained(data):
    """A tiny ViTBN after 18 Adam steps: running stats away from their init."""
    train, _, mean, std = data
    torch.manual_seed(0)
    model = create_model("vitbn", **TINY).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = InMemoryLoader(train, batch_size=32, mean=mean, std=std, shuffle=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _error(model: nn.Module, batches) -> float:
    wrong = total = 0
    for x, y in batches:
        wrong += int((model(x).argmax(-1) != y).sum())
        total += len(y)
    return 100.0 * wrong / total


def test_study_rows_match_reference_errors(data, trained, monkeypatch):
    train, val, mean, std = data
    calls = []

    def spy(model, batches, num_batches=None, **kwargs):
        used = recompute_bn_stats(model, batches, num_batches, **kwargs)
        calls.append((copy.deepcopy(model), used, sum(len(b[1]) for b in batches)))
        return used

    monkeypatch.setattr(study, "recompute_bn_stats", spy)
    state = {k: v.clone() for k, v in trained.state_dict().items()}

    rows = study.bn_study(trained, train, val, mean=mean, std=std, nbs=NBS, batch_size=64, precise_images=64)

    assert [list(r) for r in rows] == [list(study.COLUMNS)] * len(NBS)
    assert [r["nbs"] for r in rows] == NBS
    for row in rows:
        assert all(0.0 <= row[k] <= 100.0 for k in study.KINDS)
        assert row["train_images"] == 192 and row["val_images"] == 96 and row["precise_images"] == 64
    for k, v in trained.state_dict().items():  # the caller's model is not changed
        assert torch.equal(v, state[k]), k

    val_loader = InMemoryLoader(val, batch_size=96, mean=mean, std=std)
    assert rows[0]["val_ema"] == pytest.approx(_error(trained, val_loader))
    # Precise statistics: the error of the model whose BN stats recompute_bn_stats set, one call per NBS.
    assert len(calls) == len(NBS)
    for row, (model, used, images) in zip(rows, calls):
        assert images == 64 and used == 1
        assert row["val_precise"] == pytest.approx(_error(model.eval(), val_loader))
        bn = model.transformer.norm.bn
        assert not torch.allclose(bn.running_var, trained.transformer.norm.bn.running_var)
    # Mini-batch statistics with NBS 8: BN in training mode on each group of 8 validation images.
    reference = copy.deepcopy(trained)
    for m in reference.modules():
        if isinstance(m, TokenBatchNorm):
            m.train()
    groups = [(x[i : i + 8], y[i : i + 8]) for x, y in val_loader for i in range(0, len(y), 8)]
    assert rows[1]["val_batch"] == pytest.approx(_error(reference, groups))


def test_study_files_read_back(tmp_path):
    rows = [
        {"nbs": 2, "train_batch": 50.0, "val_batch": 60.5, "val_ema": 10.0, "val_precise": 12.25,
         "train_images": 100, "val_images": 50, "precise_images": 64},
        {"nbs": 4, "train_batch": 30.0, "val_batch": 35.0, "val_ema": 10.0, "val_precise": 11.0,
         "train_images": 100, "val_images": 48, "precise_images": 64},
    ]  # fmt: skip
    md, csv_path = study.write_tables(rows, tmp_path / "out")
    with csv_path.open() as f:
        back = list(csv.DictReader(f))
    assert [list(r) for r in back] == [list(study.COLUMNS)] * 2
    assert [float(r["val_precise"]) for r in back] == [12.25, 11.0] and back[1]["nbs"] == "4"
    lines = md.read_text().splitlines()
    assert lines[2] == "| " + " | ".join(study.COLUMNS) + " |"
    assert lines[4] == "| 2 | 50.00 | 60.50 | 10.00 | 12.25 | 100 | 50 | 64 |"
    png = study.plot_study(rows, tmp_path / "out" / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    tracker = MemoryTracker()
    run_id = study.log_study(tracker, rows, [md, csv_path, png], {"model": "m.pt"})
    run = tracker.runs[run_id]
    assert run.status == "FINISHED" and run.params["model"] == "m.pt"
    assert run.metrics["bn_study/val_batch_error"] == [(2, 60.5), (4, 35.0)]
    assert [a for a, _ in run.artifacts] == [md, csv_path, png]


def test_study_bad_input(data, trained):
    train, val, mean, std = data
    with pytest.raises(UserError, match=r"NBS \[128\] must be integers in \[1, 96\]"):
        study.bn_study(trained, train, val, mean=mean, std=std, nbs=[8, 128])
    with pytest.raises(UserError, match="precise_images=0 must be a positive integer"):
        study.bn_study(trained, train, val, mean=mean, std=std, nbs=[8], precise_images=0)
    with pytest.raises(UserError, match="the model has no BatchNorm"):
        study.bn_study(create_model("vit", **TINY), train, val, mean=mean, std=std, nbs=[2])
    assert study.default_nbs(5000) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert study.default_nbs(100) == [2, 4, 8, 16, 32, 64]


def test_cli_bn_study(trained, tmp_path, capsys):
    path = export_model(trained, tmp_path / "model.pt")
    out = tmp_path / "report"
    args = ["bn-study", str(path), "--dataset", "mnist", "--train-subset", "128", "--test-subset", "64",
            "--nbs", "4,16", "--eval-batch", "64", "--precise-images", "32", "--device", "cpu",
            "--out-dir", str(out), "--no-track"]  # fmt: skip
    assert main(args) == 0
    with (out / "bn_study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["nbs"]) for r in rows] == [4, 16] and all(0 <= float(r["val_precise"]) <= 100 for r in rows)
    assert rows[0]["val_images"] == "64" and rows[0]["precise_images"] == "32"
    assert (out / "bn_study.md").read_text() in capsys.readouterr().out
    assert (out / "bn_study.png").stat().st_size > 0

    assert main(["bn-study", "vitbn", "--no-track"]) == 2
    assert "MODEL 'vitbn' is a preset: give --train-epochs N" in capsys.readouterr().err
    assert main(args[:2] + ["--nbs", "4096", "--train-subset", "128", "--test-subset", "64", "--no-track"]) == 2
    assert "NBS [4096] must be integers in [1, 64]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vitbn", "vit+norm=prepbn"])  # PRepBN: the BatchNorms inside its RepBNs
def test_cli_bn_study_trains_a_preset(tmp_path, capsys, name):
    out = tmp_path / "report"
    sets = [a for kv in ("dim=16", "depth=1", "heads=2", "dim_head=8", "mlp_dim=32") for a in ("--set", kv)]
    args = ["bn-study", name, "--train-epochs", "1", *sets, "--train-subset", "96", "--test-subset", "32",
            "--batch-size", "32", "--nbs", "8", "--precise-images", "16", "--device", "cpu", "--out-dir", str(out),
            "--no-track"]  # fmt: skip
    assert main(args) == 0
    models = list((out / "train").glob("*/model.pt"))  # the engine's fit trained and exported it
    assert len(models) == 1
    with (out / "bn_study.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["nbs"] == "8" and row["train_images"] == "96" and row["precise_images"] == "16"
    trained = load_model(models[0])
    assert trained.config.name == name and prepbn_state(trained) == (0.0 if "prepbn" in name else None)
    capsys.readouterr()
    assert main(["bn-study", str(models[0]), "--train-epochs", "1", "--no-track"]) == 2
    assert "--train-epochs and --set apply to a preset name" in capsys.readouterr().err
