"""``vitbn experiment norms``: the preset's plan (six norms on one depth-6 ViT), the report's selection on
validation, failure counting and largest stable lr (on hand-made runs), and a tiny run through the CLI whose
report reads the tracked runs back."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vitbn.cli import main
from vitbn.config import NORM_SLOTS
from vitbn.experiments.norms import by_lr_table, norms_table, outcome
from vitbn.experiments.presets import load_preset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_norms_preset_plans_six_norms_at_depth_6_selected_on_validation():
    preset = load_preset("norms")
    assert [m.label for m in preset.models] == ["vit-ln", "vit-rms", "vit-dyt", "vitbnffn-bnffn", "vitbn-bn",
                                                "vit-prepbn"]  # fmt: skip
    assert preset.lrs == [0.0005, 0.005, 0.01] and len(preset.seeds) >= 2
    configs = {m.variant: preset.base_config(m, lr=0.01, seed=1) for m in preset.models}
    slots = {v: [getattr(c.model, s) for s in NORM_SLOTS] for v, c in configs.items()}
    assert slots["rms"] == ["rms", "rms", "rms", "none", "rms"]
    assert slots["dyt"] == ["dyt", "dyt", "dyt", "none", "dyt"]
    assert slots["prepbn"] == ["prepbn", "prepbn", "prepbn", "none", "prepbn"]
    assert slots["bnffn"] == ["layer", "layer", "none", "batch", "layer"]
    assert slots["bn"] == ["batch", "batch", "none", "batch", "batch"]
    assert {c.model.depth for c in configs.values()} == {6} and len({c.model.dim for c in configs.values()}) == 1
    data, train = configs["ln"].data, configs["ln"].train
    assert (data.val_size, data.test_every_epoch, train.optimizer, train.batch_size) == (2000, False, "adam", 100)
    full = load_preset("norms-full")
    assert full.run["data"].get("train_subset") is None and full.base_config(full.models[0]).train.epochs == 30


def _runs(rows):
    frame = pd.DataFrame(rows, columns=["label", "lr", "seed", "status", "val_acc", "final_acc"])
    frame["run_id"] = [f"r{i}" for i in range(len(frame))]
    frame["model"], frame["params"], frame["flops"] = "vit", 100, 1000
    history = pd.DataFrame([{"run_id": r, "epoch": e, "train_s": float(e + i)} for i, r in enumerate(frame["run_id"])
                            for e in (1, 2, 3)])  # fmt: skip
    return frame, history


def test_selection_counts_failures_apart_and_finds_the_largest_stable_lr():
    runs, history = _runs([
        ("vit-ln", 0.001, 0, "finished", 0.90, 0.89), ("vit-ln", 0.001, 1, "finished", 0.92, 0.93),
        ("vit-ln", 0.01, 0, "finished", 0.97, 0.96), ("vit-ln", 0.01, 1, "diverged", math.nan, math.nan),
        ("vit-bn", 0.001, 0, "finished", 0.95, 0.94), ("vit-bn", 0.001, 1, "finished", 0.95, 0.96),
        ("vit-bn", 0.01, 0, "finished", 0.11, 0.10), ("vit-bn", 0.01, 1, "finished", 0.98, 0.97),
    ])  # fmt: skip
    assert [outcome(s, v) for s, v in zip(runs["status"], runs["val_acc"])][2:4] == ["ok", "diverged"]
    assert outcome("finished", 0.11) == "collapsed" and outcome("killed", 0.5) == "incomplete"
    by_lr = by_lr_table(runs, history)
    ln_high = by_lr[(by_lr["label"] == "vit-ln") & (by_lr["lr"] == 0.01)].iloc[0]
    assert (ln_high["ok"], ln_high["diverged"], ln_high["collapsed"]) == (1, 1, 0)
    assert ln_high["val_select"] == pytest.approx(0.97 / 2)  # the diverged seed counts 0 in the selection
    assert ln_high["val_acc"] == pytest.approx(0.97)  # ... and not in the mean of the runs that trained
    assert ln_high["t_train"] == pytest.approx(4.5)  # run r2 alone: median of epochs 2 and 3 (4 s, 5 s)
    table = norms_table(runs, by_lr, {"vit-ln": {1: 500.0, 1000: 2000.0}}).set_index("label")
    ln, bn = table.loc["vit-ln"], table.loc["vit-bn"]
    assert (
        ln["lr"] == 0.001
        and ln["test_acc"] == pytest.approx(0.91)
        and ln["test_std"] == pytest.approx(pd.Series([0.89, 0.93]).std(ddof=1))
    )
    half = 12.7062047361747 * pd.Series([0.89, 0.93]).std(ddof=1) / math.sqrt(2)  # t(0.975, 1 dof)
    assert (ln["test_lo"], ln["test_hi"]) == pytest.approx((0.91 - half, 0.91 + half))
    assert (ln["diverged"], ln["collapsed"], ln["runs"], ln["largest_stable_lr"]) == (1, 0, 4, 0.001)
    assert bn["lr"] == 0.001 and (bn["diverged"], bn["collapsed"], bn["largest_stable_lr"]) == (0, 1, 0.001)
    assert ln["img_s_b1000"] == 2000.0 and ln["ms_b1"] == pytest.approx(2.0) and math.isnan(bn["img_s_b1000"])


def test_norms_run_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    argv = ["experiment", "norms", "--models", "vit-ln", "vit-prepbn", "--lr", "0.005", "--seeds", "0", "1",
            "--train-subset", "240", "--val-size", "80", "--test-subset", "100", "--epochs", "2", "--dim", "16",
            "--heads", "2", "--dim-head", "8", "--mlp-dim", "32", "--threads", "1", "--tracking-uri", uri,
            "--progress", "none", "--report-dir", str(tmp_path / "report")]  # fmt: skip
    assert main(argv) == 0
    assert "4 trained, 0 resumed, 0 already done" in capsys.readouterr().out
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Made by `vitbn experiment norms" in report and "runs trained at commit " in report
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("|").split(" | ")
            for line in report.split("Every learning rate:")[0].splitlines()
            if line.startswith(("| LayerNorm", "| PRepBN"))}  # fmt: skip
    assert set(rows) == {"LayerNorm", "PRepBN everywhere"}
    ln, prepbn = rows["LayerNorm"], rows["PRepBN everywhere"]
    assert (ln[1], prepbn[1], ln[4]) == ("vit", "vit+norm=prepbn", "0.005") and ln[3] == prepbn[3]  # equal FLOPs
    assert ln[7].endswith("of 2") and float(prepbn[10].replace(",", "")) > 0
    assert "| norm | lr 0.005: val / test |" in report and (tmp_path / "report" / "norms.png").stat().st_size > 1000
