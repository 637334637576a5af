"""A report from tracked runs: tables + figures -> ``report.md``, a self-contained ``report.html`` and the PNGs in
an output folder, also logged as artifacts of the experiment's parent run."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.errors import UserError
from vitbn.experiments.runs import mlflow_client, resolve_parent
from vitbn.report import plots
from vitbn.report.runs import RunSet, load_run_set
from vitbn.report.tables import (
    COLUMNS,
    comparison_sentences,
    format_cells,
    markdown_table,
    summary_table,
    usable_epoch_seconds,
)

# A report is a list of blocks, rendered twice: ("h2", text) | ("p", text) | ("ul", [items]) |
# ("table", header, cells) | ("img", file name, png bytes, caption).
Block = tuple


@dataclass
class Report:
    """The files written and the parent run the report describes."""

    out_dir: Path
    markdown: Path
    html: Path
    figures: list[Path]
    parent_id: str
    table: pd.DataFrame


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", text.replace("=", "")) or "x"


def _timing_note(runs: RunSet) -> str:
    epochs = runs.history.groupby("run_id")["epoch"].max()
    if (epochs > 2).all():
        how = "median over epochs 2 to N (epoch 1, the warm-up, excluded)"
    elif (epochs <= 2).all():
        how = "median over all epochs (runs of at most 2 epochs keep epoch 1)"
    else:
        how = "median over epochs, epoch 1 excluded in runs of more than 2 epochs"
    several = _seeds_per_model(runs) > 1
    over = "mean over the finished runs (seeds)" if several else "one seed"
    return (
        f"Accuracy and times: {over}; diverged and unfinished runs are counted in 'diverged', not averaged. "
        f"T(train), T(test): seconds per epoch, {how}. r_t = T(ViT, train) / T(model, train), "
        "r_v the same for the test pass, g = (1 - 1/r) x 100%; FLOPs ratio = FLOPs(ViT) / FLOPs(model), forward "
        "pass per image. 'vs' names the ViT each row is compared with (same depth, else the deepest). Time to "
        "97% / 98%: cumulative seconds to a usable model (training, plus PreciseBN where it ran: its own column) "
        "until the per-epoch accuracy first reaches it" + (" (mean over the runs that reach it)." if several else ".")
    )


def _seeds_per_model(runs: RunSet) -> int:
    """The most seeds any one (setting, label) has."""
    frame = runs.runs
    if frame.empty:
        return 0
    keys = [k for k in ("setting", "label") if k in frame]
    return int(frame.groupby(keys)["seed"].nunique().max())


def _epoch_figures(runs: RunSet) -> list[Block]:
    merged = runs.history.merge(runs.runs[["run_id", "setting", "label"]], on="run_id")
    columns = ["train_s", "test_s", "train_loss", "acc"]
    labels = {} if runs.per_epoch_test else {"acc": "validation accuracy", "test_s": "validation seconds per epoch"}
    blocks = []
    for setting, part in merged.groupby("setting", sort=False):
        curves = part.groupby(["label", "epoch"], sort=False)[columns].mean().reset_index()  # mean over seeds
        title = f"{setting} (mean over seeds)" if _seeds_per_model(runs) > 1 else str(setting)
        fig = plots.epoch_panels(curves, title, ylabels=labels)
        blocks.append(("img", f"epochs_{_slug(setting)}.png", plots.to_png(fig), f"Per epoch, {setting}"))
        timed = usable_seconds(part).groupby(["label", "epoch"], sort=False)[["usable_s", "acc"]].mean()
        fig = plots.acc_vs_time(timed.reset_index(), title, ylabel=labels.get("acc", "test accuracy"))
        blocks.append(("img", f"acc_vs_time_{_slug(setting)}.png", plots.to_png(fig),
                       f"Accuracy against the seconds to a usable model, {setting}"))  # fmt: skip
    return blocks


def usable_seconds(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` with ``usable_s``: per run, the cumulative train seconds plus PreciseBN's (where it ran) at the
    end of each epoch."""
    out = history.sort_values(["run_id", "epoch"]).copy()
    out["usable_s"] = usable_epoch_seconds(out).groupby(out["run_id"]).cumsum()
    return out


def _lr_figure(table: pd.DataFrame, runs: RunSet) -> list[Block]:
    sweep = runs.runs[runs.runs["phase"] == "sweep"]
    if sweep.empty:
        return []
    points = table[table["setting"].str.startswith("lr=")].copy()
    points["lr"] = [float(s[3:]) for s in points["setting"]]
    fig = plots.time_vs_lr(points, column="t_train")
    return [("img", "time_vs_lr.png", plots.to_png(fig), "Train seconds per epoch against the learning rate")]


def _tuning_blocks(trials: pd.DataFrame) -> list[Block]:
    if trials.empty:
        return []
    cells = []
    for label, part in trials.groupby("label", sort=False):
        done = part.dropna(subset=["acc"])
        best = done.loc[done["acc"].idxmax()] if len(done) else None
        cells.append(
            [
                label,
                str(len(part)),
                str(int((part["status"] == "diverged").sum())),
                "-" if best is None else f"{best['acc'] * 100:.2f}%",
                "-" if best is None else f"{best['lr']:.3g}",
                "-" if best is None else str(int(best["batch_size"])),
                "-" if best is None else str(int(best["trial"])),
            ]
        )
    header = ["model", "trials", "diverged", "best val acc", "lr", "batch size", "trial"]
    fig = plots.best_so_far(trials)
    return [
        ("h2", "Tuning"),
        ("table", header, cells),
        ("img", "tuning.png", plots.to_png(fig), "Best validation accuracy so far against the trial"),
    ]


def report_blocks(parent_name: str, description: str, runs: RunSet) -> tuple[list[Block], pd.DataFrame]:
    """The report's content; pure given the run set (tests build it from synthetic runs)."""
    blocks: list[Block] = [("h1", f"vitbn report: {parent_name}")]
    if description:
        blocks.append(("p", description))
    table = pd.DataFrame()
    if not runs.runs.empty:
        table = summary_table(runs.runs, runs.history)
        blocks += [
            ("h2", "Comparison"),
            ("table", [name for _, name in COLUMNS], format_cells(table)),
            ("p", _timing_note(runs)),
        ]
        sentences = comparison_sentences(table)
        if sentences:
            blocks += [("h2", "Depth and FLOPs"), ("ul", sentences)]
        if runs.notes:
            blocks.append(("ul", runs.notes))
        blocks += [("h2", "Figures"), *_epoch_figures(runs), *_lr_figure(table, runs)]
    blocks += _tuning_blocks(runs.trials)
    if len(blocks) == 1 + bool(description):
        blocks.append(("p", "No finished runs yet."))
    return blocks, table


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            out.append(f"{'#' * int(kind[1])} {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            out.append(markdown_table(block[1], block[2]))
        elif kind == "img":
            out.append(f"![{block[3]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained page: the PNGs are embedded as base64 data URIs."""
    e = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[2]).decode()
            body.append(
                f'<figure><img alt="{e(block[3])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(block[3])}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(title)}</title><style>{style}</style>'
        f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(blocks: list[Block], out_dir: str | Path, title: str) -> tuple[Path, Path, list[Path]]:
    """Writes report.md, report.html and the PNGs into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for block in blocks:
        if block[0] == "img":
            figures.append(out / block[1])
            figures[-1].write_bytes(block[2])
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, title))
    return md, page, figures


def build_report(
    key: str,
    out_dir: str | Path,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log_artifacts: bool = True,
) -> Report:
    """Builds the report of an experiment from MLflow.

    Args:
        key: the parent run id, or a preset / parent run name (the latest such parent).
        out_dir: the output folder.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db).
        experiment: restrict the name lookup to this MLflow experiment.
        log_artifacts: also log the files as artifacts (``report/``) of the parent run.
    """
    client = mlflow_client(tracking_uri)
    parent = resolve_parent(client, key, experiment)
    if parent.data.tags.get("vitbn.role") != "parent":
        raise UserError(f"run {key} is not an experiment's parent run (made by `vitbn experiment`)")
    runs = load_run_set(client, parent)
    name = parent.info.run_name or parent.info.run_id
    blocks, table = report_blocks(name, parent.data.tags.get("vitbn.description", ""), runs)
    md, page, figures = write_report(blocks, out_dir, f"vitbn report: {name}")
    if log_artifacts:
        for path in (md, page, *figures):
            client.log_artifact(parent.info.run_id, str(path), "report")
    return Report(Path(out_dir), md, page, figures, parent.info.run_id, table)
