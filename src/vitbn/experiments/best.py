"""``vitbn experiment best``: the best MNIST model this toolkit trains, per norm (ViT and ViTBN).

The runs are an lr sweep of the ``best`` preset (every recipe and light augmentation on, ``presets.BEST_MODELS``),
so they resume like any sweep. Each run holds out a stratified 10% of the training images; the epoch of best
validation accuracy is kept (``best.pt``) and the test set is read once, for it (``best/test_acc``). The report
says, per model, which epoch validation chose, its test accuracy against the target, and the wall-clock it took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.engine.selection import BEST_NAME
from vitbn.experiments.recipes import load_experiment, save_figure, write_report
from vitbn.provenance import current
from vitbn.report.build import runs_sentence
from vitbn.report.tables import markdown_table

TARGET = 0.995  # the goal: test accuracy of a ViT of about 1M parameters or less
HEADER = ["model", "params", "epochs", "chosen epoch (val)", "val acc", "test acc (chosen)", "test acc (last)",
          f"target {100 * TARGET:.1f}%", "wall-clock to chosen (min)", "wall-clock total (min)",
          "train img/s (last epoch)"]  # fmt: skip


@dataclass
class BestReport:
    table: pd.DataFrame  # one row per finished run, with its selected checkpoint's path (``checkpoint``)
    markdown: Path
    figure: Path


def best_table(runs: pd.DataFrame, history: pd.DataFrame, best: dict[str, dict[str, float]],
               img_s: dict[str, float]) -> pd.DataFrame:  # fmt: skip
    """One row per finished run: the epoch validation chose (``best``: run id -> its ``best/*`` metrics), its
    validation and test accuracy, the last epoch's test accuracy (``final_acc``), and the wall-clock of training
    plus validation up to the chosen epoch and in all, and the training throughput (``img_s``: run id -> images per
    second of its last epoch)."""
    rows = []
    for _, r in runs[runs["status"] == "finished"].iterrows():
        metrics = best.get(r["run_id"], {})
        h = history[history["run_id"] == r["run_id"]].sort_values("epoch")
        seconds = (h["train_s"].fillna(0) + h["val_time_s"].fillna(0)).cumsum()
        chosen = metrics.get("best/epoch", math.nan)
        upto = seconds[h["epoch"] <= chosen]
        rows.append({"label": r["label"], "model": r["model"], "run_id": r["run_id"], "params": int(r["params"]),
                     "epochs": int(h["epoch"].max()) if len(h) else 0, "best_epoch": chosen,
                     "val_acc": metrics.get("best/val_acc", math.nan),
                     "test_acc": metrics.get("best/test_acc", math.nan), "last_test_acc": r["final_acc"],
                     "to_chosen_s": float(upto.iloc[-1]) if len(upto) else math.nan,
                     "total_s": float(seconds.iloc[-1]) if len(seconds) else math.nan,
                     "img_s": img_s.get(r["run_id"], math.nan)})  # fmt: skip
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if math.isfinite(x) else "-"


def verdict(acc: float) -> str:
    if not math.isfinite(acc):
        return "-"
    return "met" if acc >= TARGET else f"NOT met ({100 * (acc - TARGET):+.2f} points)"


def _cells(table: pd.DataFrame) -> list[list[str]]:
    return [[r["label"], f"{r['params']:,}", str(r["epochs"]),
             f"{r['best_epoch']:.0f}" if math.isfinite(r["best_epoch"]) else "-", _pct(r["val_acc"]),
             _pct(r["test_acc"]), _pct(r["last_test_acc"]), verdict(r["test_acc"]), f"{r['to_chosen_s'] / 60:.1f}",
             f"{r['total_s'] / 60:.1f}", f"{r['img_s']:.0f}"] for _, r in table.iterrows()]  # fmt: skip


def _figure(table: pd.DataFrame, history: pd.DataFrame, path: Path) -> Path:
    """Validation accuracy and training loss per epoch, the chosen epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for _, r in table.iterrows():
        h = history[history["run_id"] == r["run_id"]].sort_values("epoch")
        (line,) = acc_ax.plot(h["epoch"], 100 * h["val_acc"], marker="o", markersize=3, label=r["label"])
        if math.isfinite(r["best_epoch"]):
            chosen = ([r["best_epoch"]], [100 * r["val_acc"]])
            acc_ax.scatter(*chosen, s=90, facecolors="none", edgecolors=line.get_color())
        loss_ax.plot(h["epoch"], h["train_loss"], label=r["label"])
    acc_ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1, label="target (test)")
    acc_ax.set(title="validation accuracy (circle: the chosen epoch)", xlabel="epoch", ylabel="%",
               ylim=(97, 100))  # fmt: skip
    loss_ax.set(title="training loss (label smoothing 0.1)", xlabel="epoch")
    for ax in (acc_ax, loss_ax):
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_best_report(key: str, out_dir: str | Path, *, tracking_uri: str | None = None) -> BestReport:
    """The best experiment's table and figure, for the parent run ``key`` (id or name)."""
    made = current()
    client, parent, runs, _ = load_experiment(key, tracking_uri)
    fetched = {run_id: client.get_run(run_id).data for run_id in runs.runs["run_id"]}
    best = {run_id: {k: v for k, v in d.metrics.items() if k.startswith("best/")} for run_id, d in fetched.items()}
    img_s = {run_id: d.metrics.get("throughput/train_img_s", math.nan) for run_id, d in fetched.items()}
    table = best_table(runs.runs, runs.history, best, img_s)
    folders = {run_id: Path(d.params.get("train.out_dir", "runs")) / d.params.get("track.run_name", "")
               for run_id, d in fetched.items()}  # fmt: skip
    table["checkpoint"] = [str(folders[run_id] / BEST_NAME) for run_id in table.get("run_id", [])]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = _figure(table, runs.history, out / "best.png")
    body = [
        f"{made.line()} {runs_sentence(runs.runs)}", "",
        markdown_table(HEADER, _cells(table)), "",
        "chosen epoch: the epoch of highest accuracy on the run's validation split (a stratified 10% of the "
        "training images), kept as best.pt; test acc (chosen): the test set read once, for that checkpoint; test "
        "acc (last): after the last epoch, for comparison only (it chose nothing); wall-clock: training and "
        "validation seconds summed over epochs (augmentation included, start-up and the final test excluded).", "",
        *[f"Note: {n}" for n in runs.notes],
    ]  # fmt: skip
    return BestReport(table, write_report(client, parent, out, body, figure), figure)


def keep_runs_for_demo(table: pd.DataFrame, root: str | Path) -> list[str]:
    """Each run's selected checkpoint becomes the demo's default for its model (``root/demo/<name>.pt``) when its
    validation accuracy beats the one kept there; one line per run says what happened."""
    from vitbn.serve.predictor import keep_for_demo as keep

    lines = []
    for _, r in table.iterrows():
        if not Path(r["checkpoint"]).exists():
            lines.append(f"{r['label']}: {r['checkpoint']} is not on this machine; the demo's default is unchanged")
            continue
        kept = keep(r["checkpoint"], root)
        lines.append(f"{r['label']}: the demo's default is now {kept} (val acc {100 * r['val_acc']:.2f}%)" if kept
                     else f"{r['label']}: the demo keeps its default (as good or better on validation)")  # fmt: skip
    return lines
