"""The report's numbers against hand computations on a synthetic run set, and its files."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vitbn.report import plots
from vitbn.report.build import report_blocks, to_markdown, write_report
from vitbn.report.runs import RunSet, model_config_from_params, model_size
from vitbn.report.tables import (
    comparison_sentences,
    epoch_selection_cells,
    flops_sentence,
    format_cells,
    per_epoch_median,
    selection_sentences,
    selection_table,
    summary_table,
    time_to_reach,
)

# Per run: (model, depth, seed, flops, train seconds, test seconds, accuracy) for epochs 1..4.
RUNS = {
    "a0": ("vit", 6, 0, 6e6, [9, 2.0, 2.0, 2.2], [1, 1, 1, 1], [0.9, 0.965, 0.975, 0.985]),
    "a1": ("vit", 6, 1, 6e6, [9, 2.2, 2.0, 2.2], [1, 1, 1, 1], [0.9, 0.95, 0.96, 0.971]),
    "b0": ("vitbn", 1, 0, 1e6, [3, 0.5, 0.5, 0.5], [0.4, 0.25, 0.25, 0.25], [0.5] * 4),
    "b1": ("vitbn", 1, 1, 1e6, [3, 0.7, 0.7, 0.7], [0.4, 0.25, 0.25, 0.25], [0.5] * 4),
}


def synthetic() -> RunSet:
    runs, history = [], []
    for run_id, (model, depth, seed, flops, train_s, test_s, acc) in RUNS.items():
        runs.append(
            {
                "run_id": run_id,
                "setting": "lr=0.001",
                "phase": "sweep",
                "lr": 1e-3,
                "model": model,
                "depth": depth,
                "label": f"{model}-d{depth}",
                "seed": seed,
                "final_acc": acc[-1],
                "params": 1000 * depth,
                "flops": flops,
            }
        )
        for epoch in range(4):
            history.append(
                {
                    "run_id": run_id,
                    "epoch": epoch + 1,
                    "train_s": train_s[epoch],
                    "test_s": test_s[epoch],
                    "train_loss": 1.0 / (epoch + 1),
                    "acc": acc[epoch],
                }
            )
    trials = pd.DataFrame(
        {
            "label": ["vit-d6"] * 3,
            "trial": [0, 1, 2],
            "acc": [0.9, math.nan, 0.95],
            "lr": [1e-4, 1e-2, 3e-4],
            "batch_size": [50, 20, 90],
            "status": ["finished", "diverged", "finished"],
        }
    )
    return RunSet(pd.DataFrame(runs), pd.DataFrame(history), trials)


def test_per_epoch_median_leaves_out_warmup_only_beyond_two_epochs():
    assert per_epoch_median(pd.Series([9.0, 2.0, 4.0]), pd.Series([1, 2, 3])) == 3.0
    assert per_epoch_median(pd.Series([9.0, 2.0]), pd.Series([1, 2])) == 5.5


def test_time_to_reach_is_cumulative_train_time_at_first_epoch_reaching():
    h = pd.DataFrame({"epoch": [2, 1, 3], "train_s": [2.0, 9.0, 2.0], "acc": [0.975, 0.9, 0.99]})
    assert time_to_reach(h, 0.97) == 11.0
    assert time_to_reach(h, 0.98) == 13.0
    assert math.isnan(time_to_reach(h, 0.995))


def test_summary_table_against_hand_computation():
    table = summary_table(synthetic().runs, synthetic().history).set_index("label")
    vit, bn = table.loc["vit-d6"], table.loc["vitbn-d1"]
    assert vit["t_train"] == pytest.approx((2.0 + 2.2) / 2)  # medians of epochs 2-4, mean over seeds
    assert bn["t_train"] == pytest.approx((0.5 + 0.7) / 2)
    assert bn["t_test"] == pytest.approx(0.25)
    assert bn["ref"] == "ViT (depth 6)"
    assert bn["r_t"] == pytest.approx(2.1 / 0.6)
    assert bn["g_t"] == pytest.approx((1 - 0.6 / 2.1) * 100)
    assert bn["r_v"] == pytest.approx(4.0)
    assert bn["g_v"] == pytest.approx(75.0)
    assert bn["flops_ratio"] == pytest.approx(6.0)
    assert vit["r_t"] == pytest.approx(1.0) and vit["g_t"] == pytest.approx(0.0)
    assert vit["acc_mean"] == pytest.approx((0.985 + 0.971) / 2)
    assert vit["acc_std"] == pytest.approx(0.014 / math.sqrt(2))  # sample std (ddof 1) of 0.985 and 0.971
    half = 12.7062047361747 * 0.007  # Student t(0.975, 1 dof) x std / sqrt(2)
    assert (vit["acc_lo"], vit["acc_hi"]) == pytest.approx((0.978 - half, 0.978 + half))
    assert (vit["acc_min"], vit["acc_max"]) == (0.971, 0.985)
    assert vit["t97"] == pytest.approx(((9 + 2 + 2) + (9 + 2.2 + 2 + 2.2)) / 2) and vit["t97_n"] == 2
    assert vit["t98"] == pytest.approx(9 + 2 + 2 + 2.2) and vit["t98_n"] == 1
    assert bn["t97_n"] == 0


def test_formatted_cells_say_not_reached_and_partial_seeds():
    table = summary_table(synthetic().runs, synthetic().history)
    cells = {row[1]: row for row in format_cells(table)}
    assert cells["ViT"][-2:] == ["14.2 s", "15.2 s (1/2 runs)"]
    assert cells["ViTBN"][-2:] == ["not reached", "not reached"]
    assert cells["ViT"][3:7] == ["2", "0", "-", "97.80% ± 0.99 (95% CI 88.91-100.00)"]
    assert cells["ViTBN"][13:18] == ["3.50", "71.4%", "4.00", "75.0%", "6.00"]
    assert cells["ViT"][11] == "-"  # no PreciseBN


def test_precise_bn_time_has_its_column_and_counts_in_the_time_to_a_usable_model():
    runs = synthetic()
    history = runs.history.assign(precise_s=[0.5 if r == "a0" else math.nan for r in runs.history["run_id"]])
    table = summary_table(runs.runs, history).set_index("label")
    vit = table.loc["vit-d6"]
    assert vit["t_precise"] == pytest.approx(0.5)  # a0's median; a1 did not run PreciseBN
    # a0 reaches 97% at epoch 3: (9 + 2 + 2) s of training + 3 x 0.5 s of PreciseBN; a1 at epoch 4 without it
    assert vit["t97"] == pytest.approx(((9 + 2 + 2 + 1.5) + (9 + 2.2 + 2 + 2.2)) / 2)
    assert time_to_reach(history[history["run_id"] == "a0"], 0.98) == pytest.approx(9 + 2 + 2 + 2.2 + 2.0)
    cells = {row[1]: row for row in format_cells(table.reset_index())}
    assert cells["ViT"][11] == "0.500"
    from vitbn.report.build import usable_seconds

    usable = usable_seconds(history)
    assert usable[usable["run_id"] == "a0"]["usable_s"].tolist() == pytest.approx([9.5, 12.0, 14.5, 17.2])


def test_diverged_and_unfinished_runs_are_counted_not_averaged():
    runs = synthetic()
    frame = runs.runs.assign(status="finished", batch_size=100)
    extra = frame[frame["run_id"] == "a0"].assign(run_id="a2", seed=2, final_acc=0.1, status="diverged")
    killed = frame[frame["run_id"] == "a0"].assign(run_id="a3", seed=3, final_acc=0.5, status="killed")
    frame = pd.concat([frame, extra, killed], ignore_index=True)
    history = pd.concat([runs.history, runs.history[runs.history["run_id"] == "a0"].assign(run_id="a2",
                         train_s=100.0), runs.history[runs.history["run_id"] == "a0"].assign(run_id="a3")])  # fmt: skip
    table = summary_table(frame, history).set_index("label")
    vit = table.loc["vit-d6"]
    assert (vit["seeds"], vit["runs"], vit["diverged"], vit["unfinished"]) == (2, 2, 1, 1)
    assert vit["acc_mean"] == pytest.approx((0.985 + 0.971) / 2)  # the diverged 10% and the killed run left out
    assert vit["t_train"] == pytest.approx((2.0 + 2.2) / 2)  # and the diverged run's 100 s epochs too
    cells = {row[1]: row for row in format_cells(table.reset_index())}
    assert cells["ViT"][3:6] == ["2", "1 (+1 unfinished)", "100"]
    # two runs of one seed count as one seed, not two
    same_seed = frame[frame["run_id"].isin(["b0", "b1"])].assign(seed=0)
    assert summary_table(same_seed, history).iloc[0]["seeds"] == 1


def test_flops_sentences():
    table = summary_table(synthetic().runs, synthetic().history)
    assert comparison_sentences(table) == [
        "[lr=0.001] ViTBN (depth 1) trains 3.5x faster per epoch than ViT (depth 6); it does 6.0x fewer FLOPs "
        "per image, more than the time ratio: a part of the time does not shrink with the FLOPs (per-operator "
        "overhead, data handling, the head); on a model time = fixed + c x FLOPs it is about 50% of ViTBN (depth "
        "1)'s epoch."
    ]
    # the fair study's layout, both models at depths 1 and 6: a shallow model against the deeper ViT, never a deep
    # BN model against the shallow ViT
    rows = [("vit", 1, 1.0, 1.0), ("vitbn", 1, 1.0, 1.0), ("vit", 6, 6.0, 6.0), ("vitbn", 6, 6.0, 6.0)]
    fair = pd.DataFrame([{"setting": "s", "model": m, "depth": d, "label": f"{m}-d{d}", "t_train": t, "flops": f}
                         for m, d, t, f in rows])  # fmt: skip
    assert [x.split(";")[0] for x in comparison_sentences(fair)] == [
        "[s] ViT (depth 1) trains 6.0x faster per epoch than ViT (depth 6)",
        "[s] ViTBN (depth 1) trains 6.0x faster per epoch than ViT (depth 6)",
    ]
    # the quick report's figures: 4.9x faster, 5.9x fewer FLOPs is not "the whole ratio"
    quick = flops_sentence({"model": "vitbn", "depth": 1, "t_train": 1.0, "flops": 1.0},
                           {"model": "vit", "depth": 6, "t_train": 4.9, "flops": 5.9})  # fmt: skip
    assert "whole ratio" not in quick and "about 20% of ViTBN (depth 1)'s epoch" in quick
    assert flops_sentence(
        {"model": "vitbn", "depth": 6, "t_train": 1.0, "flops": 1.0},
        {"model": "vit", "depth": 6, "t_train": 4.0, "flops": 4.1},
    ).endswith("the whole ratio.")
    row = {"model": "vitbn", "depth": 6, "t_train": 1.0, "flops": 3.0}
    ref = {"model": "vit", "depth": 6, "t_train": 4.0, "flops": 6.0}
    assert flops_sentence(row, ref) == (
        "ViTBN (depth 6) trains 4.0x faster per epoch than ViT (depth 6); it does 2.0x fewer FLOPs per image, "
        "which accounts for about 50% of the ratio (log scale); the remaining 2.0x is not explained by FLOPs."
    )
    assert flops_sentence({**row, "t_train": 8.0, "flops": 2.0}, ref) == (
        "ViTBN (depth 6) trains 2.0x slower per epoch than ViT (depth 6); it does 3.0x fewer FLOPs per image, so "
        "FLOPs do not explain the difference."
    )
    assert flops_sentence({**row, "t_train": 4.0}, ref) == (
        "ViTBN (depth 6) trains as fast per epoch as ViT (depth 6) although it does 2.0x fewer FLOPs per image."
    )


def test_report_files(tmp_path):
    blocks, _ = report_blocks("study", "synthetic", synthetic())
    md_text = to_markdown(blocks)
    assert "| setting | model | depth | seeds | diverged | batch | final acc |" in md_text
    assert "| r_t | g_t | r_v | g_v | FLOPs ratio |" in md_text
    md, page, figures = write_report(blocks, tmp_path / "out", "t")
    assert sorted(f.name for f in figures) == [
        "acc_vs_time_lr0.001.png",
        "epochs_lr0.001.png",
        "time_vs_lr.png",
        "tuning.png",
        "tuning_lr_batch.png",
    ]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    assert md.read_text() == md_text
    assert page.read_text().count('src="data:image/png;base64,iVBORw0KGgo') == 5
    # no prediction recorded (no vitbn.best tag): the best observed trial, said so
    assert "| vit-d6 | 3 | 1 | 2 | 0.0003 | 90 | - | 95.00% | 95.00% |" in md_text
    assert "For vit-d6 no prediction was recorded" in md_text


def test_plots_draw_one_line_per_label():
    curves = synthetic().history.merge(synthetic().runs[["run_id", "label"]], on="run_id")
    fig = plots.epoch_panels(curves.groupby(["label", "epoch"]).mean(numeric_only=True).reset_index(), "t")
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 2, 2]
    assert fig.axes[3].lines[0].get_ydata().tolist() == pytest.approx([0.9, 0.9575, 0.9675, 0.978])
    best = plots.best_so_far(synthetic().trials)
    assert best.axes[0].lines[0].get_ydata().tolist() == [0.9, 0.9, 0.95]


def test_model_size_from_logged_params(tiny_overrides):
    from vitbn.config import flatten, to_dict
    from vitbn.models import count_params, create_model, forward_flops

    model = create_model("vitbn", **tiny_overrides)
    params = {k: str(v) for k, v in flatten({"model": to_dict(model.config)}).items()}
    assert model_config_from_params(params) == model.config
    assert model_size(params) == (count_params(model), forward_flops(model))


def test_epoch_selection_rows_and_which_split_chose_what():
    base = {"model": "vit", "depth": 3, "seed": 0, "epochs": 20, "status": "finished", "phase": "sweep"}
    runs = pd.DataFrame([
        {**base, "label": "vit-a", "lr": 0.001, "val_acc": 0.98, "final_acc": 0.9906, "test_every_epoch": False,
         "best_epoch": 16.0, "best_val_acc": 0.98766, "best_test_acc": 0.9905},
        {**base, "label": "vit-b", "lr": 0.001, "val_acc": 0.97, "final_acc": 0.97, "test_every_epoch": False,
         "best_epoch": math.nan, "best_val_acc": math.nan, "best_test_acc": math.nan},
    ])  # fmt: skip
    assert epoch_selection_cells(runs) == [["vit-a", "0.001", "0", "16", "20", "98.77%", "99.05%", "99.06%"]]
    lines = selection_sentences(runs, selection_table(runs))
    assert lines == [
        "Epoch: chosen on the validation split (its best epoch, kept as best.pt); the test set was read once for that "
        "checkpoint (test acc (chosen)).",
        "Test set: read once, at the end; it chose nothing.",
    ]
    study = runs.drop(columns=["best_epoch"]).assign(val_acc=math.nan, test_every_epoch=True, lr=[0.0005, 0.005])
    assert epoch_selection_cells(study) == []
    assert selection_sentences(study, selection_table(study)) == [
        "Learning rate: not chosen (no validation split); every rate is shown, none is a selection.",
        "Test set: evaluated after every epoch (the study's practice), so any best-over-epochs figure is chosen on the "
        "test set and optimistic; it selects nothing here.",
    ]
    swept = runs.assign(lr=[0.0005, 0.005], model=["vit", "vit"])
    assert selection_sentences(swept, selection_table(swept))[0].startswith("Learning rate: chosen on the validation")
