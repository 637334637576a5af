"""``vitbn compare``: two or more training runs side by side, read from their run folders (``config.yaml`` and
``history.json``, what every ``vitbn train`` run writes): the settings that differ, the final metrics, and the
per-epoch curves on shared axes, as Markdown and HTML like the reports. ``run_curves`` is the one-run figure that
``vitbn train`` writes beside its model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.config import flatten, load_yaml
from vitbn.errors import UserError

CURVES_NAME = "curves.png"
# Settings that name a run rather than describe it: not listed as differences.
NOT_SETTINGS = ("track.run_name", "train.resume")
ACC_LABEL = {"acc": "accuracy (val, else test)", "test_s": "evaluation seconds per epoch"}


@dataclass
class RunRecord:
    """One run as its folder holds it."""

    label: str
    folder: Path
    settings: dict  # the config, flattened with dots
    history: list[dict]


def find_run(spec: str, runs_dir: str | Path = "runs") -> Path:
    """A run folder: ``spec`` itself, else ``runs_dir/spec``, else a run of that name one level deeper (the runs
    of an experiment: ``runs/<experiment>/<run>``).

    Raises:
        UserError: none of these is a folder holding ``history.json``.
    """
    root = Path(runs_dir)
    candidates = [Path(spec), root / spec, *sorted(root.glob(f"*/{spec}"))]
    for folder in candidates:
        if (folder / "history.json").is_file():
            return folder
    raise UserError(f"no run {spec!r}: neither a run folder nor a run under {root}/ (a folder with history.json)")


def read_run(folder: Path) -> RunRecord:
    """The run of ``folder`` (``config.yaml`` may be missing: no settings then)."""
    try:
        history = json.loads((folder / "history.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"run folder {folder}: history.json cannot be read ({exc})") from None
    config = folder / "config.yaml"
    settings = flatten(load_yaml(config)) if config.is_file() else {}
    return RunRecord(folder.name, folder, settings, history if isinstance(history, list) else [])


def curves(runs: list[RunRecord]) -> pd.DataFrame:
    """One row per (run, epoch) with the columns ``epoch_panels`` plots."""
    rows = []
    for run in runs:
        for r in run.history:
            acc = r.get("val/acc", r.get("test/acc"))
            rows.append(
                {"label": run.label, "epoch": r.get("epoch"), "train_s": r.get("time/train_epoch_s"),
                 "test_s": r.get("time/eval_epoch_s"), "train_loss": r.get("train/loss"), "acc": acc}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["label", "epoch", "train_s", "test_s", "train_loss", "acc"])


def differences(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """The settings whose values are not the same in every run: (header, rows)."""
    keys = sorted({k for run in runs for k in run.settings} - set(NOT_SETTINGS))
    rows = []
    for key in keys:
        values = [run.settings.get(key, "-") for run in runs]
        if len({json.dumps(v, default=str) for v in values}) > 1:
            rows.append([key, *(str(v) for v in values)])
    return ["setting", *(run.label for run in runs)], rows


def final_metrics(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Per run: epochs, last training loss, last validation and test accuracy, median training seconds per
    epoch (epoch 1, the warm-up, left out when there are more)."""
    header = ["run", "epochs", "train loss", "val acc", "test acc", "train s/epoch (median)"]
    rows = []
    for run in runs:
        last = run.history[-1] if run.history else {}
        seconds = pd.Series([r.get("time/train_epoch_s") for r in run.history], dtype=float)
        seconds = seconds.iloc[1:] if len(seconds) > 1 else seconds

        def pct(key: str, last: dict = last) -> str:
            return f"{100 * last[key]:.2f}%" if key in last else "-"

        loss = f"{last['train/loss']:.4f}" if "train/loss" in last else "-"
        median = f"{seconds.median():.2f}" if seconds.notna().any() else "-"
        rows.append([run.label, str(len(run.history)), loss, pct("val/acc"), pct("test/acc"), median])
    return header, rows


def compare_runs(specs: list[str], out_dir: str | Path, runs_dir: str | Path = "runs"):
    """Writes the comparison of the runs ``specs`` names into ``out_dir``; returns (report.md, report.html, the
    final-metrics table as (header, rows)).

    Raises:
        UserError: fewer than two runs, a run not found, or the same run twice.
    """
    from vitbn.report.build import write_report
    from vitbn.report.plots import epoch_panels, to_png

    folders = [find_run(spec, runs_dir) for spec in specs]
    if len(folders) < 2 or len({f.resolve() for f in folders}) < len(folders):
        raise UserError(f"compare needs two or more different runs; got {', '.join(map(str, folders))}")
    runs = [read_run(f) for f in folders]
    diff_header, diff_rows = differences(runs)
    metrics = final_metrics(runs)
    figure = epoch_panels(curves(runs), "per-epoch curves", ylabels=ACC_LABEL)
    blocks = [
        ("h1", f"vitbn compare: {', '.join(r.label for r in runs)}"),
        ("p", "Runs: " + ", ".join(str(r.folder) for r in runs) + "."),
        ("h2", "Final metrics"),
        ("table", *metrics),
        ("h2", "Settings that differ"),
        ("table", diff_header, diff_rows) if diff_rows else ("p", "The runs have the same settings."),
        ("h2", "Curves"),
        ("img", "curves.png", to_png(figure), "loss, accuracy and epoch times of the runs, on shared axes"),
    ]
    md, page, _ = write_report(blocks, out_dir, "vitbn compare")
    return md, page, metrics


def run_curves(folder: str | Path) -> Path:
    """The figure of one run's curves (loss, accuracy, epoch times), written as ``folder/curves.png``."""
    from vitbn.report.plots import epoch_panels, to_png

    run = read_run(Path(folder))
    path = Path(folder) / CURVES_NAME
    path.write_bytes(to_png(epoch_panels(curves([run]), f"run {run.label}", ylabels=ACC_LABEL)))
    return path
