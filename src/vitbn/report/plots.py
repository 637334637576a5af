"""Pure figure functions: DataFrames in, matplotlib Figures out (Agg backend, nothing shown or saved here)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first: reports are built headless)
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# The four per-epoch panels of the study's figures: (column, y label).
EPOCH_PANELS = (
    ("train_s", "train seconds per epoch"),
    ("test_s", "test seconds per epoch"),
    ("train_loss", "training loss"),
    ("acc", "test accuracy"),
)


def _labels_in_order(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["label"]))


def epoch_panels(curves: pd.DataFrame, title: str, *, ylabels: dict[str, str] | None = None) -> Figure:
    """The 2 x 2 figure: train and test seconds per epoch, training loss and accuracy against the epoch.

    Args:
        curves: one row per (label, epoch) with columns ``label``, ``epoch`` and ``train_s``, ``test_s``,
            ``train_loss``, ``acc`` (already averaged over seeds); a missing or all-NaN column leaves its panel
            with a note.
        title: the figure title (e.g. the learning rate).
        ylabels: replaces panel labels by column (e.g. ``{"acc": "validation accuracy"}``).

    Returns:
        The figure, one line per label.
    """
    names = {**dict(EPOCH_PANELS), **(ylabels or {})}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (column, _) in zip(axes.flat, EPOCH_PANELS):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(names[column])
        ax.grid(alpha=0.3)
        if column not in curves or curves[column].isna().all():
            ax.text(0.5, 0.5, "not recorded per epoch", ha="center", va="center", transform=ax.transAxes)
            continue
        for label in _labels_in_order(curves):
            part = curves[curves["label"] == label].sort_values("epoch")
            ax.plot(part["epoch"], part[column], marker="o", markersize=3, label=label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def acc_vs_time(curves: pd.DataFrame, title: str, *, ylabel: str = "test accuracy") -> Figure:
    """Accuracy against the cumulative seconds to a usable model (training, plus PreciseBN where it ran), one
    line per label: what a reader with a time budget compares.

    Args:
        curves: one row per (label, epoch) with ``label``, ``epoch``, ``usable_s`` (cumulative seconds at the
            end of the epoch) and ``acc``.
        title: the figure title.
        ylabel: the y axis label.
    """
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label in _labels_in_order(curves):
        part = curves[curves["label"] == label].sort_values("epoch")
        ax.plot(part["usable_s"], part["acc"], marker="o", markersize=3, label=label)
    ax.set_xlabel("seconds to a usable model (train + PreciseBN, cumulative)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def time_vs_lr(points: pd.DataFrame, *, column: str = "train_s", ylabel: str = "train seconds per epoch") -> Figure:
    """Seconds per epoch against the learning rate, one line per label.

    Args:
        points: one row per (label, lr) with columns ``label``, ``lr`` and ``column``.
        column: the column plotted.
        ylabel: the y axis label.
    """
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label in _labels_in_order(points):
        part = points[points["label"] == label].sort_values("lr")
        ax.plot(part["lr"], part[column], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def best_so_far(trials: pd.DataFrame) -> Figure:
    """Tuning progress: the best validation accuracy so far against the trial, one line per label.

    Args:
        trials: one row per trial with columns ``label``, ``trial`` (0-based index) and ``acc`` (NaN for a
            failed trial, which keeps the best so far unchanged).
    """
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label in _labels_in_order(trials):
        part = trials[trials["label"] == label].sort_values("trial")
        best = part["acc"].cummax().ffill()  # a failed trial (NaN) keeps the best so far
        (line,) = ax.step(part["trial"], best, where="post", label=label)
        ax.scatter(part["trial"], part["acc"], s=12, alpha=0.5, color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation accuracy so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def trials_scatter(trials: pd.DataFrame, best: dict[str, dict]) -> Figure:
    """Tuning: every trial at (learning rate, batch size) colored by its validation accuracy, one panel per label;
    failed (diverged) trials as grey crosses, the chosen parameters (``best[label]``) ringed in red.

    Args:
        trials: one row per trial with ``label``, ``lr``, ``batch_size``, ``acc`` (NaN for a failed trial).
        best: label -> ``{"lr", "batch_size", ...}``, the chosen point (labels without one are left unmarked).
    """
    labels = _labels_in_order(trials)
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels) + 1, 3.8), constrained_layout=True,
                             squeeze=False)  # fmt: skip
    done = trials["acc"].dropna()
    vmin, vmax = (done.min(), done.max()) if len(done) else (0.0, 1.0)
    points = None
    for ax, label in zip(axes[0], labels):
        part = trials[trials["label"] == label]
        ok, failed = part[part["acc"].notna()], part[part["acc"].isna()]
        points = ax.scatter(ok["lr"], ok["batch_size"], c=ok["acc"], cmap="viridis", vmin=vmin, vmax=vmax, s=36)
        ax.scatter(failed["lr"], failed["batch_size"], marker="x", color="0.5", s=36, label="failed")
        if label in best:
            ax.scatter([best[label]["lr"]], [best[label]["batch_size"]], s=180, facecolors="none",
                       edgecolors="red", linewidths=2, label="chosen")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if len(failed) or label in best:
            ax.legend(fontsize=8)
    if points is not None:
        fig.colorbar(points, ax=axes[0].tolist(), label="validation accuracy")
    return fig


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (figures are not kept alive by pyplot)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
