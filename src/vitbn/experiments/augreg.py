"""``vitbn experiment augreg``: augmentation against regularization on small data (Steiner et al. 2021), for the
ViT (LayerNorm) and ViTBN at one depth.

Every cell (training-set size x augmentation level x regularization) is one entry of an lr sweep (``presets.
_augreg_models``), so the runs resume like any sweep. Each run holds out a stratified 10% of its images for
validation; the epoch of best validation accuracy is kept (``best.pt``) and the test set is read once for it
(``best/test_acc``). The report shows, per model and size, the validation and test accuracy of every cell, the
gain over the plain cell (no augmentation, no regularization), and the cell that validation selects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.experiments.presets import AUGREG_LEVELS, AUGREG_REG
from vitbn.experiments.recipes import load_experiment, save_figure, write_report
from vitbn.provenance import current
from vitbn.report.build import runs_sentence
from vitbn.report.tables import markdown_table, per_epoch_median

HEADER = ["model", "images", "augmentation", "regularization", "best epoch", "val acc", "test acc",
          "gain over plain (points)", "T(train) s/epoch"]  # fmt: skip
PLAIN = ("none", "reg0")


@dataclass
class AugregReport:
    table: pd.DataFrame
    markdown: Path
    figure: Path


def cells_table(runs: pd.DataFrame, history: pd.DataFrame, best: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per finished run: model, size, level, regularization, the best epoch's validation and test accuracy
    (``best``: run id -> its ``best/*`` metrics), the test-accuracy gain over the plain cell of the same model and
    size, and the median training seconds per epoch."""
    rows = []
    for _, r in runs[runs["status"] == "finished"].iterrows():
        size, level, reg = r["label"].split("-", 1)[1].rsplit("-", 2)
        metrics = best.get(r["run_id"], {})
        h = history[history["run_id"] == r["run_id"]]
        rows.append({"model": r["model"], "size": size, "level": level, "reg": reg, "run_id": r["run_id"],
                     "best_epoch": metrics.get("best/epoch", math.nan),
                     "val_acc": metrics.get("best/val_acc", math.nan),
                     "test_acc": metrics.get("best/test_acc", math.nan),
                     "t_train": per_epoch_median(h["train_s"], h["epoch"]) if len(h) else math.nan})  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    plain = table[(table["level"] == PLAIN[0]) & (table["reg"] == PLAIN[1])].set_index(["model", "size"])["test_acc"]
    table["gain"] = [100 * (acc - plain.get((m, s), math.nan))
                     for m, s, acc in zip(table["model"], table["size"], table["test_acc"])]  # fmt: skip
    table["_size"] = table["size"].map(_size_key)
    table["_level"] = table["level"].map(AUGREG_LEVELS.index)
    table = table.sort_values(["model", "_size", "_level", "reg"]).drop(columns=["_size", "_level"])
    return table.reset_index(drop=True)


def _size_key(size: str) -> float:
    """``"1k"`` -> 1000 (sorts sizes by their number)."""
    return float(size[:-1]) * 1000 if size.endswith("k") else float(size)


def selected(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and size, the cell of highest validation accuracy (the first of equals), with its test accuracy."""
    picks = table.loc[table.groupby(["model", "size"], sort=False)["val_acc"].idxmax()]
    return picks.reset_index(drop=True)


def verdicts(table: pd.DataFrame) -> list[str]:
    """Per model and size: the mean test-accuracy gain of augmentation alone (light, medium, heavy; no
    regularization) against regularization alone (no augmentation), in points."""
    out = []
    for (model, size), g in table.groupby(["model", "size"], sort=False):
        aug = g[(g["level"] != "none") & (g["reg"] == "reg0")]["gain"]
        reg = g[(g["level"] == "none") & (g["reg"] != "reg0")]["gain"]
        if aug.empty or reg.empty:
            continue
        best_aug = g.loc[aug.idxmax()]
        which = "more" if aug.mean() > reg.mean() else "less"
        out.append(f"{model}, {size} images: augmentation alone {aug.mean():+.2f} points on average (best: "
                   f"{best_aug['level']}, {best_aug['gain']:+.2f}), regularization alone {reg.mean():+.2f}: "
                   f"augmentation helps {which} than regularization here.")  # fmt: skip
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if math.isfinite(x) else "-"


def _reg(name: str) -> str:
    return "none" if name == "reg0" else "dropout + drop-path 0.1"


def _cells(table: pd.DataFrame) -> list[list[str]]:
    return [[r["model"], r["size"], r["level"], _reg(r["reg"]),
             f"{r['best_epoch']:.0f}" if math.isfinite(r["best_epoch"]) else "-", _pct(r["val_acc"]),
             _pct(r["test_acc"]), f"{r['gain']:+.2f}" if math.isfinite(r["gain"]) else "-", f"{r['t_train']:.2f}"]
            for _, r in table.iterrows()]  # fmt: skip


def _figure(table: pd.DataFrame, path: Path) -> Path:
    """A heatmap per (model, size) of the gain over the plain cell, levels by regularization (the paper's Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table.groupby(["model", "size"], sort=False))
    regs = list(AUGREG_REG)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    limit = max(1.0, float(table["gain"].abs().max()))
    for ax, ((model, size), g) in zip(axes[0], groups):
        grid = [[g[(g["level"] == lv) & (g["reg"] == rg)]["gain"].mean() for rg in regs] for lv in AUGREG_LEVELS]
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, "-" if not math.isfinite(value) else f"{value:+.1f}", ha="center", va="center")
        ax.set(title=f"{model}, {size} images", xticks=range(len(regs)), xticklabels=["none", "0.1"],
               yticks=range(len(AUGREG_LEVELS)), yticklabels=AUGREG_LEVELS, xlabel="regularization")  # fmt: skip
    fig.colorbar(image, ax=axes[0].tolist(), label="test acc gain over plain (points)")
    return save_figure(fig, path, tight="bbox")


def build_augreg_report(key: str, out_dir: str | Path, *, tracking_uri: str | None = None) -> AugregReport:
    """The augreg table, verdicts and heatmap of the experiment whose parent run is ``key`` (id or name)."""
    made = current()
    client, parent, runs, _ = load_experiment(key, tracking_uri)
    best = {run_id: {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("best/")}
            for run_id in runs.runs["run_id"]}  # fmt: skip
    table = cells_table(runs.runs, runs.history, best)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = _figure(table, out / "augreg.png")
    picks = selected(table)
    body = [
        f"{made.line()} {runs_sentence(runs.runs)}", "",
        markdown_table(HEADER, _cells(table)), "",
        "best epoch: the epoch of highest accuracy on the run's validation split (a stratified 10% of its images); "
        "val / test acc: at that epoch (the test set read once, for it); gain: test accuracy minus the plain cell's "
        "(no augmentation, no regularization) of the same model and size; T(train): median seconds per training "
        "epoch (epoch 1 excluded), augmentation included.", "",
        "Selected on validation (per model and size, the cell of highest validation accuracy):", "",
        markdown_table(["model", "images", "augmentation", "regularization", "val acc", "test acc"],
                       [[r["model"], r["size"], r["level"], _reg(r["reg"]), _pct(r["val_acc"]), _pct(r["test_acc"])]
                        for _, r in picks.iterrows()]), "",  # fmt: skip
        *[f"- {v}" for v in verdicts(table)], "",
        *[f"Note: {n}" for n in runs.notes],
    ]  # fmt: skip
    return AugregReport(table, write_report(client, parent, out, body, figure), figure)
