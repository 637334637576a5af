"""A report from tracked runs: tables + figures -> ``report.md``, a self-contained ``report.html`` and the PNGs in
an output folder, also logged as artifacts of the experiment's parent run."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.errors import UserError
from vitbn.experiments.runs import mlflow_client, resolve_parent
from vitbn.provenance import Provenance, current
from vitbn.report import plots
from vitbn.report.runs import RunSet, load_run_set
from vitbn.report.tables import (
    COLUMNS,
    EPOCH_SELECTION_HEADER,
    comparison_sentences,
    epoch_selection_cells,
    format_cells,
    markdown_table,
    selection_cells,
    selection_sentences,
    selection_table,
    summary_table,
    usable_epoch_seconds,
)

DATA_FILE = "data.json"  # next to report.md: what it was rendered from (``render_saved`` renders it again)

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


def _tuning_blocks(trials: pd.DataFrame, best: dict[str, dict]) -> list[Block]:
    """The chosen parameters per model (the BoTorch model's predicted best among the evaluated arms, from the
    parent's tags; the raw best observed trial for a parent tuned before those tags, said so), best-so-far and the
    lr x batch scatter."""
    if trials.empty:
        return []
    cells, raw = [], []
    for label, part in trials.groupby("label", sort=False):
        done = part.dropna(subset=["acc"])
        chosen = best.get(label)
        if chosen is None and len(done):
            top = done.loc[done["acc"].idxmax()]
            chosen = {"lr": top["lr"], "batch_size": top["batch_size"], "val_acc": top["acc"], "trial": top["trial"]}
            raw.append(label)
        observed = done[done["trial"] == chosen["trial"]]["acc"] if chosen else pd.Series(dtype=float)
        cells.append(
            [
                label,
                str(len(part)),
                str(int((part["status"] == "diverged").sum())),
                "-" if chosen is None else str(int(chosen["trial"])),
                "-" if chosen is None else f"{chosen['lr']:.3g}",
                "-" if chosen is None else str(int(chosen["batch_size"])),
                "-" if chosen is None or label in raw else f"{chosen['val_acc'] * 100:.2f}%",
                "-" if observed.empty else f"{observed.iloc[0] * 100:.2f}%",
                "-" if done.empty else f"{done['acc'].max() * 100:.2f}%",
            ]
        )
    header = ["model", "trials", "diverged", "chosen trial", "lr", "batch size", "predicted val acc",
              "observed val acc", "best observed"]  # fmt: skip
    text = (
        "Validation accuracy: the tuning objective, the mean of the last epochs of a trial. The chosen trial is "
        "the evaluated one the BoTorch model predicts best (its prediction and the observed value side by side)."
    )
    if raw:
        text += f" For {', '.join(raw)} no prediction was recorded: the chosen trial is the best observed one."
    return [
        ("h2", "Tuning"),
        ("table", header, cells),
        ("p", text),
        ("img", "tuning.png", plots.to_png(plots.best_so_far(trials)),
         "Best validation accuracy so far against the trial"),
        ("img", "tuning_lr_batch.png", plots.to_png(plots.trials_scatter(trials, best)),
         "Every trial at its learning rate and batch size, colored by validation accuracy; the chosen one ringed"),
    ]  # fmt: skip


def _selection_blocks(runs: RunSet) -> list[Block]:
    table = selection_table(runs.runs)
    sentences = selection_sentences(runs.runs, table)
    blocks: list[Block] = [("h2", "What the validation split chose"), ("ul", sentences)] if sentences else []
    if not table.empty:
        header, cells = selection_cells(table)
        text = (
            "Per model, the learning rate with the highest mean final validation accuracy over its seeds (a diverged "
            "or unfinished seed counts 0 in the choice; the val acc columns average the finished ones), and the test "
            "accuracy of the finished runs at that rate: mean ± sample std and the Student-t 95% interval of the "
            "mean over seeds (wide with few seeds). The test set plays no part in the choice."
        )
        blocks += [("h2", "Learning rate chosen on validation"), ("table", header, cells), ("p", text)]
    epochs = epoch_selection_cells(runs.runs)
    if epochs:
        blocks += [("h2", "Epoch chosen on validation"), ("table", EPOCH_SELECTION_HEADER, epochs)]
    return blocks


def runs_sentence(runs: pd.DataFrame) -> str:
    """Where the compared runs ran, from their tags: commit(s), machine(s), threads, torch."""
    if runs.empty or "commit" not in runs:
        return ""

    def values(column: str) -> str:
        return ", ".join(sorted({str(v) for v in runs[column]}))

    return (
        f"The {len(runs)} runs trained at commit {values('commit')} on {values('machine')} "
        f"({values('threads')} threads, torch {values('torch')})."
    )


def settings_sentence(runs: pd.DataFrame) -> str:
    """What the runs were trained on, from their own params (a preset's description may name other subsets, when
    flags changed them): ``"As run: 200 training and 50 test images, 2 epochs."``."""
    if runs.empty or not {"train_subset", "test_subset", "epochs"} <= set(runs):
        return ""  # a data.json written before the subsets were recorded

    def values(column: str, all_of: str) -> str:
        found = sorted({str(v) for v in runs[column]}, key=lambda v: (len(v), v))
        return " / ".join(all_of if v in ("None", "nan") else v for v in found)

    return (
        f"As run: {values('train_subset', 'all')} training and {values('test_subset', 'all')} test images, "
        f"{values('epochs', '?')} epochs."
    )


def report_blocks(
    parent_name: str, description: str, runs: RunSet, provenance: list[str] | None = None
) -> tuple[list[Block], pd.DataFrame]:
    """The report's content; pure given the run set (tests build it from synthetic runs). ``provenance``: lines
    saying what wrote the page (``Provenance.line()``), put under the title with where the runs ran."""
    blocks: list[Block] = [("h1", f"vitbn report: {parent_name}")]
    if description:
        blocks.append(("p", description))
    if settings_sentence(runs.runs):
        blocks.append(("p", settings_sentence(runs.runs)))
    where = " ".join([*(provenance or []), runs_sentence(runs.runs)]).strip()
    if where:
        blocks.append(("p", where))
    head = len(blocks)
    table = pd.DataFrame()
    if not runs.runs.empty:
        table = summary_table(runs.runs, runs.history)
        blocks += [
            ("h2", "Comparison"),
            ("table", [name for _, name in COLUMNS], format_cells(table)),
            ("p", _timing_note(runs)),
            *_selection_blocks(runs),
        ]
        sentences = comparison_sentences(table)
        if sentences:
            blocks += [("h2", "Depth and FLOPs"), ("ul", sentences)]
        if runs.notes:
            blocks.append(("ul", runs.notes))
        blocks += [("h2", "Figures"), *_epoch_figures(runs), *_lr_figure(table, runs)]
    blocks += _tuning_blocks(runs.trials, runs.best)
    if len(blocks) == head:
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
    command: str | None = None,
) -> Report:
    """Builds the report of an experiment from MLflow.

    Args:
        key: the parent run id, or a preset / parent run name (the latest such parent).
        out_dir: the output folder.
        tracking_uri: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db).
        experiment: restrict the name lookup to this MLflow experiment.
        log_artifacts: also log the files as artifacts (``report/``) of the parent run.
        command: the command named on the page as its maker (default: this process's command line).

    Besides the page it writes ``data.json``: the run set it shows and the provenance, from which
    ``render_saved`` (``vitbn report --from``) renders the same page without the MLflow store.
    """
    client = mlflow_client(tracking_uri, reading=True)
    parent = resolve_parent(client, key, experiment)
    if parent.data.tags.get("vitbn.role") != "parent":
        raise UserError(f"run {key} is not an experiment's parent run (made by `vitbn experiment`)")
    runs = load_run_set(client, parent)
    saved = {
        "parent": parent.info.run_name or parent.info.run_id,
        "parent_id": parent.info.run_id,
        "description": parent.data.tags.get("vitbn.description", ""),
        "provenance": current(command).to_dict(),
        "runs": runs.to_dict(),
    }
    report = _render(saved, runs, out_dir, [])
    if log_artifacts:
        for path in (report.markdown, report.html, *report.figures, report.out_dir / DATA_FILE):
            client.log_artifact(parent.info.run_id, str(path), "report")
    return report


def _render(saved: dict, runs: RunSet, out_dir: str | Path, extra: list[str]) -> Report:
    lines = [Provenance.from_dict(saved["provenance"]).line(), *extra]
    blocks, table = report_blocks(saved["parent"], saved["description"], runs, lines)
    md, page, figures = write_report(blocks, out_dir, f"vitbn report: {saved['parent']}")
    (Path(out_dir) / DATA_FILE).write_text(json.dumps(saved, indent=1, allow_nan=False) + "\n")
    return Report(Path(out_dir), md, page, figures, saved["parent_id"], table)


def render_saved(path: str | Path, out_dir: str | Path, command: str | None = None) -> Report:
    """Renders a report again from the ``data.json`` a report wrote (no MLflow store needed): the same tables and
    figures, with the original provenance line and one saying when and by what it was rendered again."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
        runs = RunSet.from_dict(saved["runs"])
        name = saved["parent"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (a report's {DATA_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a report's {DATA_FILE} ({type(exc).__name__}: {exc})") from None
    now = current(command)
    again = f"Rendered again from {path.name} by `{now.command}` at commit {now.commit[:7]}."
    return _render({**saved, "parent": name}, runs, out_dir, [again])
