"""``vitbn experiment norms``: LayerNorm, RMSNorm, DyT, the study's two BatchNorm placements and PRepBN on one
depth-6 ViT, at three learning rates and several seeds, each norm's learning rate selected on the validation split.

The runs are an lr sweep over the norm variants (``presets.NORM_VARIANTS``), so they resume like any sweep. The
report reads them back from MLflow and adds what training does not measure: each norm's inference throughput after
``fuse_bn`` (what a deployed model runs: PRepBN at lambda = 0, every BatchNorm folded), all norms timed in the same
interleaved rounds on this machine.

A run *diverged* when its training loss became non-finite (the engine stops it); it *collapsed* when it finished
at a validation accuracy below ``COLLAPSE_ACC`` (twice chance on 10 classes): both are counted apart and do not
enter the accuracy means. The largest stable learning rate is the largest at which every seed did neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.experiments.recipes import load_experiment, provenance, save_figure, write_report
from vitbn.provenance import current
from vitbn.report.tables import format_acc, markdown_table, mean_interval, per_epoch_median

COLLAPSE_ACC = 0.2
NORM_NAMES = {"ln": "LayerNorm", "rms": "RMSNorm", "dyt": "DyT", "bnffn": "BN in FFN (ViTBNFFN)",
              "bn": "BN everywhere (ViTBN)", "prepbn": "PRepBN everywhere"}  # fmt: skip
HEADER = ["norm", "model", "params", "MFLOPs/img", "selected lr", "val acc", "test acc", "diverged / collapsed",
          "largest stable lr", "T(train) s/epoch", "folded img/s b1000", "folded ms b1"]  # fmt: skip


@dataclass
class NormsReport:
    table: pd.DataFrame
    by_lr: pd.DataFrame
    markdown: Path
    figure: Path


def outcome(status: str, val_acc: float) -> str:
    """``"diverged"`` (non-finite loss), ``"collapsed"`` (finished below ``COLLAPSE_ACC`` on validation) or
    ``"ok"``; runs still going (any other status) are ``"incomplete"``."""
    if status == "diverged":
        return "diverged"
    if status != "finished":
        return "incomplete"
    return "collapsed" if not val_acc >= COLLAPSE_ACC else "ok"


def by_lr_table(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per (norm label, lr): seeds, outcomes, mean validation and test accuracy over the ``ok`` seeds,
    and the median seconds per training epoch (mean over those seeds)."""
    runs = runs.assign(outcome=[outcome(s, v) for s, v in zip(runs["status"], runs["val_acc"])])
    rows = []
    for (label, lr), group in runs.groupby(["label", "lr"], sort=False):
        ok = group[group["outcome"] == "ok"]
        times = [per_epoch_median(h["train_s"], h["epoch"])
                 for _, h in history[history["run_id"].isin(ok["run_id"])].groupby("run_id")]  # fmt: skip
        rows.append({
            "label": label, "lr": lr, "seeds": len(group), "ok": len(ok),
            "diverged": int((group["outcome"] == "diverged").sum()),
            "collapsed": int((group["outcome"] == "collapsed").sum()),
            "incomplete": int((group["outcome"] == "incomplete").sum()),
            # selection: a failed seed counts as accuracy 0, so an lr that fails for any seed is rarely chosen
            "val_select": float(group["val_acc"].where(group["outcome"] == "ok", 0.0).fillna(0.0).mean()),
            "val_acc": float(ok["val_acc"].mean()) if len(ok) else math.nan,
            **dict(zip(("test_acc", "test_std", "test_lo", "test_hi"), mean_interval(ok["final_acc"]))),
            "t_train": sum(times) / len(times) if times else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


def norms_table(runs: pd.DataFrame, by_lr: pd.DataFrame, throughput: dict[str, dict[int, float]]) -> pd.DataFrame:
    """One row per norm: the lr with the best mean validation accuracy, its test accuracy (mean and std over the
    ok seeds), the failures over all lrs, the largest stable lr, the epoch time at the selected lr and the folded
    inference throughput."""
    rows = []
    for label, group in by_lr.groupby("label", sort=False):
        best = group.loc[group["val_select"].idxmax()]
        stable = group[(group["ok"] == group["seeds"]) & (group["incomplete"] == 0)]
        first = runs[runs["label"] == label].iloc[0]
        rows.append({
            "label": label, "variant": label.split("-", 1)[1], "model": first["model"],
            "params": int(first["params"]), "flops": int(first["flops"]),
            "lr": best["lr"], "val_acc": best["val_acc"], "test_acc": best["test_acc"], "test_std": best["test_std"],
            "test_lo": best["test_lo"], "test_hi": best["test_hi"],
            "ok": int(best["ok"]), "runs": int(group["seeds"].sum()),
            "diverged": int(group["diverged"].sum()), "collapsed": int(group["collapsed"].sum()),
            "largest_stable_lr": float(stable["lr"].max()) if len(stable) else math.nan,
            "t_train": best["t_train"],
            "img_s_b1000": throughput.get(label, {}).get(1000, math.nan),
            "ms_b1": 1000.0 / throughput.get(label, {}).get(1, math.nan),
        })  # fmt: skip
    return pd.DataFrame(rows)


def folded_throughput(configs: dict[str, object], batches=(1, 1000), repeats: int = 7) -> dict[str, dict[int, float]]:
    """Images per second of each config's model after ``fuse_bn`` (PRepBN at lambda 0, eval mode, fp32, eager),
    per batch; the models of one batch timed in interleaved rounds."""
    from vitbn.bench.cases import eval_img_s, fold
    from vitbn.models import build_model
    from vitbn.models.norms import set_prepbn_lambda

    models = {}
    for label, config in configs.items():
        model = build_model(config)
        set_prepbn_lambda(model, 0.0)  # what training leaves: lambda reaches 0 at the last step
        models[label] = fold(model)
    out: dict[str, dict[int, float]] = {label: {} for label in configs}
    for batch in batches:
        for label, value in eval_img_s(models, batch, repeats).items():
            out[label][batch] = value
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if math.isfinite(x) else "-"


def _cells(table: pd.DataFrame) -> list[list[str]]:
    return [[
        NORM_NAMES.get(r["variant"], r["variant"]), r["model"], f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}",
        f"{r['lr']:g}", _pct(r["val_acc"]),
        f"{format_acc(r['test_acc'], r['test_std'], r['test_lo'], r['test_hi'], r['ok'])} ({r['ok']} seeds)",
        f"{r['diverged']} / {r['collapsed']} of {r['runs']}",
        f"{r['largest_stable_lr']:g}" if math.isfinite(r["largest_stable_lr"]) else "none",
        f"{r['t_train']:.2f}", f"{r['img_s_b1000']:,.0f}", f"{r['ms_b1']:.2f}",
    ] for _, r in table.iterrows()]  # fmt: skip


def _lr_cells(by_lr: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    lrs = sorted(by_lr["lr"].unique())
    cells = []
    for label, group in by_lr.groupby("label", sort=False):
        row = [NORM_NAMES.get(label.split("-", 1)[1], label)]
        for lr in lrs:
            g = group[group["lr"] == lr]
            if g.empty:
                row.append("-")
                continue
            r = g.iloc[0]
            failed = [f"{r[k]} {k}" for k in ("diverged", "collapsed", "incomplete") if r[k]]
            row.append(f"{_pct(r['val_acc'])} / {_pct(r['test_acc'])}" + (f" ({', '.join(failed)})" if failed else ""))
        cells.append(row)
    return ["norm", *[f"lr {lr:g}: val / test" for lr in lrs]], cells


def _figure(table: pd.DataFrame, by_lr: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for label, group in by_lr.groupby("label", sort=False):
        name = NORM_NAMES.get(label.split("-", 1)[1], label)
        axes[0].plot(group["lr"], 100 * group["val_select"], marker="o", label=name)
    axes[0].set(xscale="log", title="validation accuracy (failed seeds count 0)", xlabel="lr", ylabel="%")
    axes[0].legend(fontsize=8)
    names = [NORM_NAMES.get(v, v) for v in table["variant"]]
    for ax, column, title in ((axes[1], "t_train", "train s/epoch (selected lr)"),
                              (axes[2], "img_s_b1000", "folded inference img/s, batch 1000")):  # fmt: skip
        ax.barh(names, table[column])
        ax.set(title=title)
        ax.invert_yaxis()
    return save_figure(fig, path)


def build_norms_report(key: str, out_dir: str | Path, *, tracking_uri: str | None = None) -> NormsReport:
    """The norms tables (Markdown) and figure of the experiment whose parent run is ``key`` (id or name)."""
    made = current()
    client, parent, runs, configs = load_experiment(key, tracking_uri)
    by_lr = by_lr_table(runs.runs, runs.history)
    table = norms_table(runs.runs, by_lr, folded_throughput(configs))
    table["model"] = [configs[label].name for label in table["label"]]  # "vit+norm=prepbn", not the preset's
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = _figure(table, by_lr, out / "norms.png")
    lr_header, lr_cells = _lr_cells(by_lr)
    body = [
        provenance(made, runs.runs, "the throughput columns"), "",
        markdown_table(HEADER, _cells(table)), "",
        "selected lr: the lr with the best mean validation accuracy over the seeds (a failed seed counts 0); val / "
        "test acc: after the last epoch at that lr, mean ± sample std and the Student-t 95% interval of the mean over "
        "the seeds that trained; diverged: "
        f"non-finite training loss; collapsed: finished below {100 * COLLAPSE_ACC:.0f}% validation accuracy; "
        "largest stable lr: the largest lr at which every seed trained; T(train): median seconds per training "
        "epoch (epoch 1 excluded when there are more than 2), mean over seeds; folded: `fuse_bn` applied (PRepBN at "
        "lambda 0; LayerNorm, RMSNorm and DyT are not foldable and stay), eval mode, fp32, eager, the norms timed "
        "in interleaved rounds when the report was built.", "",
        "Every learning rate:", "", markdown_table(lr_header, lr_cells), "",
        *[f"Note: {n}" for n in runs.notes],
    ]  # fmt: skip
    return NormsReport(table, by_lr, write_report(client, parent, out, body, figure), figure)
