"""Run tables -> the comparison table, the study's ratios and the plain-language FLOPs sentences.

Inputs are two DataFrames built from tracked runs (``vitbn.report.runs``) or by hand in tests:

- ``runs``: one row per run: ``run_id``, ``setting`` (what the rows compared side by side share, e.g.
  ``"lr=0.0005"`` or ``"tuned"``), ``model`` (registered name), ``depth``, ``label``, ``seed``, ``final_acc``,
  ``params``, ``flops`` (forward FLOPs per image).
- ``history``: one row per (run, epoch): ``run_id``, ``epoch`` (from 1), ``train_s``, ``test_s`` (seconds per
  epoch), ``train_loss``, ``acc`` (the per-epoch accuracy: test, or validation when the test set is kept for the end).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

DISPLAY = {"vit": "ViT", "vitbnffn": "ViTBNFFN", "vitbn": "ViTBN"}
THRESHOLDS = (0.97, 0.98)
REFERENCE_MODEL = "vit"


def display_name(model: str, depth: int) -> str:
    """``"ViTBN (depth 1)"``."""
    return f"{DISPLAY.get(model, model)} (depth {depth})"


def per_epoch_median(values: pd.Series, epochs: pd.Series) -> float:
    """Median seconds per epoch, leaving out epoch 1 (warm-up: allocations, first-call overheads) when the run has
    more than 2 epochs."""
    keep = epochs > 1 if len(epochs) > 2 else epochs >= 1
    return float(values[keep].median())


def time_to_reach(history: pd.DataFrame, threshold: float) -> float:
    """Cumulative seconds to a usable model at the end of the first epoch whose accuracy reaches ``threshold``
    (NaN if none): training, plus PreciseBN's recomputation of the statistics when the run used it
    (``precise_s``), since the model is not usable before it."""
    h = history.sort_values("epoch")
    reached = np.flatnonzero(h["acc"].to_numpy() >= threshold)
    return float(usable_epoch_seconds(h).cumsum().iloc[reached[0]]) if len(reached) else math.nan


def usable_epoch_seconds(history: pd.DataFrame) -> pd.Series:
    """Per epoch: its train seconds plus PreciseBN's (``precise_s``, where the run used it)."""
    return history["train_s"] + (history["precise_s"].fillna(0.0) if "precise_s" in history else 0.0)


def run_stats(history: pd.DataFrame) -> pd.DataFrame:
    """Per run: ``t_train``, ``t_test`` (median seconds per epoch), ``epochs`` and the time to each threshold."""
    rows = []
    for run_id, h in history.groupby("run_id", sort=False):
        row = {"run_id": run_id, "epochs": int(h["epoch"].max()), "t_train": per_epoch_median(h["train_s"], h["epoch"])}
        precise = h.dropna(subset=["precise_s"]) if "precise_s" in h else h.iloc[:0]
        row["t_precise"] = per_epoch_median(precise["precise_s"], precise["epoch"]) if len(precise) else math.nan
        test = h.dropna(subset=["test_s"])
        row["t_test"] = per_epoch_median(test["test_s"], test["epoch"]) if len(test) else math.nan
        for thr in THRESHOLDS:
            row[f"t{round(thr * 100)}"] = time_to_reach(h.dropna(subset=["acc"]), thr)
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", "epochs", "t_train", "t_precise", "t_test", *_time_cols()])


def _time_cols() -> list[str]:
    return [f"t{round(thr * 100)}" for thr in THRESHOLDS]


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std (ddof 1), low, high) of ``values`` (NaNs dropped), with the Student-t interval of the mean
    mean ± t(1 - (1 - confidence) / 2, n - 1) · std / sqrt(n). NaN where undefined (std and interval need n >= 2)."""
    from scipy import stats

    x = np.asarray(pd.Series(values, dtype="float64").dropna())
    if len(x) == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def _aggregate(group: pd.DataFrame) -> dict:
    """Accuracy and times of the group's finished runs (a diverged, failed or killed run is counted in its own
    columns, not averaged in); ``seeds`` is the number of distinct seeds among them."""
    status = group["status"] if "status" in group else pd.Series("finished", index=group.index)
    done = group[status == "finished"]
    acc = done["final_acc"].dropna()
    acc_mean, acc_std, acc_lo, acc_hi = mean_interval(acc)
    out = {
        "seeds": int(done["seed"].nunique()) if "seed" in done else len(done),
        "runs": len(done),
        "diverged": int((status == "diverged").sum()),
        "unfinished": int((~status.isin(["finished", "diverged"])).sum()),
        "batch": ",".join(str(b) for b in sorted(set(group["batch_size"]))) if "batch_size" in group else "",
        "acc_mean": acc_mean,
        "acc_std": acc_std,
        "acc_lo": acc_lo,
        "acc_hi": acc_hi,
        "acc_min": acc.min(),
        "acc_max": acc.max(),
        "params": group["params"].iloc[0],
        "flops": group["flops"].iloc[0],
        "t_train": done["t_train"].mean(),
        "t_test": done["t_test"].mean(),
        "t_precise": done["t_precise"].mean() if "t_precise" in done else math.nan,
    }
    for col in _time_cols():
        out[col] = done[col].mean()  # over the runs that reached the threshold
        out[f"{col}_n"] = int(done[col].notna().sum())
    return out


def reference_row(rows: pd.DataFrame, depth: int) -> pd.Series | None:
    """The ViT a model is compared with: same depth when there is one, else the deepest ViT."""
    vits = rows[rows["model"] == REFERENCE_MODEL]
    if vits.empty:
        return None
    same = vits[vits["depth"] == depth]
    return same.iloc[0] if len(same) else vits.sort_values("depth").iloc[-1]


def add_ratios(row: dict, ref: pd.Series | None) -> dict:
    """The study's ratios against ``ref``: r_t = T(ViT, train) / T(model, train), r_v (test), the gains
    g = (1 - 1/r) x 100% and the FLOPs ratio FLOPs(ViT) / FLOPs(model)."""
    row = dict(row)
    if ref is None:
        return {
            **row,
            "ref": "",
            "r_t": math.nan,
            "g_t": math.nan,
            "r_v": math.nan,
            "g_v": math.nan,
            "flops_ratio": math.nan,
        }
    row["ref"] = display_name(ref["model"], int(ref["depth"]))
    row["r_t"] = ref["t_train"] / row["t_train"]
    row["r_v"] = ref["t_test"] / row["t_test"]
    row["g_t"] = (1 - 1 / row["r_t"]) * 100
    row["g_v"] = (1 - 1 / row["r_v"]) * 100
    row["flops_ratio"] = ref["flops"] / row["flops"]
    if int(ref["depth"]) == int(row.get("depth", -1)):  # against a ViT of another depth, any ratio may be real
        _warn_implausible(row)
    return row


# Time ratios beyond this factor between two norms of one architecture are not the norms' doing: the machine was
# busy with something else for part of the runs (a g_t of -1321% was seen under load).
PLAUSIBLE_RATIO = 3.0


def _warn_implausible(row: dict) -> None:
    for ratio, gain, what in (("r_t", "g_t", "training"), ("r_v", "g_v", "test")):
        r = row[ratio]
        if math.isfinite(r) and r > 0 and not 1 / PLAUSIBLE_RATIO <= r <= PLAUSIBLE_RATIO:
            name = display_name(row["model"], int(row["depth"])) if "model" in row and "depth" in row else "a model"
            warnings.warn(
                f"{gain} {row[gain]:.1f}% for {name}: its {what} epochs took {1 / r:.2f}x as long as {row['ref']}'s, "
                f"beyond {PLAUSIBLE_RATIO:g}x either way; the timings were likely disturbed by other load on the "
                "machine: measure again on a quiet one",
                stacklevel=3,
            )


def summary_table(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, model, depth): accuracy over seeds, size, times per epoch, ratios to the reference ViT
    (``reference_row``) and the time to reach each accuracy threshold."""
    merged = runs.merge(run_stats(history), on="run_id", how="left")
    rows = []
    for (setting, model, depth), group in merged.groupby(["setting", "model", "depth"], sort=False):
        rows.append(
            {
                "setting": setting,
                "model": model,
                "depth": int(depth),
                "label": group["label"].iloc[0],
                **_aggregate(group),
            }
        )
    table = pd.DataFrame(rows)
    out = []
    for _, rows_of_setting in table.groupby("setting", sort=False):
        for _, row in rows_of_setting.iterrows():
            out.append(add_ratios(row.to_dict(), reference_row(rows_of_setting, int(row["depth"]))))
    return pd.DataFrame(out).reset_index(drop=True)


def _times(x: float) -> str:
    return f"{x:.1f}x" if x < 9.95 else f"{x:.0f}x"


def flops_sentence(row: pd.Series | dict, ref: pd.Series | dict) -> str:
    """How much of the train time ratio r between ``row`` and ``ref`` the FLOPs ratio f explains: the share
    log(f) / log(r) (so 2x fewer FLOPs explain half of a 4x speed-up)."""
    r = ref["t_train"] / row["t_train"]
    f = ref["flops"] / row["flops"]
    who, than = display_name(row["model"], int(row["depth"])), display_name(ref["model"], int(ref["depth"]))
    work = f"{_times(f)} fewer" if f >= 1 else f"{_times(1 / f)} more"
    if abs(math.log(r)) < 0.02:  # within 2%
        return f"{who} trains as fast per epoch as {than} although it does {work} FLOPs per image."
    speed = f"{_times(r)} faster" if r > 1 else f"{_times(1 / r)} slower"
    head = f"{who} trains {speed} per epoch than {than}; it does {work} FLOPs per image"
    share = math.log(f) / math.log(r)
    if 0.95 <= share <= 1.05:
        return f"{head}, which accounts for the whole ratio."
    if share > 1.05:  # the FLOPs predict a larger ratio than measured: a cost that does not scale with them
        big, small = (r, f) if r > 1 else (1 / r, 1 / f)
        fixed = 1 - (big - 1) / (small - 1)
        cheaper = who if f > 1 else than
        return (
            f"{head}, more than the time ratio: a part of the time does not shrink with the FLOPs (per-operator "
            f"overhead, data handling, the head); on a model time = fixed + c x FLOPs it is about {fixed:.0%} of "
            f"{cheaper}'s epoch."
        )
    if share < 0:
        return f"{head}, so FLOPs do not explain the difference."
    if share <= 0.05:
        return f"{head}, which accounts for almost none of the ratio."
    rest = r / f
    return (
        f"{head}, which accounts for about {share:.0%} of the ratio (log scale); the remaining "
        f"{_times(rest if rest >= 1 else 1 / rest)} is not explained by FLOPs."
    )


def comparison_sentences(table: pd.DataFrame, *, flops_tolerance: float = 0.05) -> list[str]:
    """A sentence for every model compared with a deeper ViT, or a ViT of the same depth and other FLOPs per image,
    in the same setting (each ViT present is a reference, so a table with ViTs at depth 1 and 6 also gets the
    study's depth-1 BN against depth-6 ViT comparison, and not the reverse)."""
    out = []
    for setting, rows in table.groupby("setting", sort=False):
        vits = rows[rows["model"] == REFERENCE_MODEL]
        for _, row in rows.iterrows():
            for _, ref in vits.iterrows():
                if ref["label"] == row["label"]:
                    continue
                if row["model"] == REFERENCE_MODEL:
                    wanted = ref["depth"] > row["depth"]  # the depth effect, once per pair of ViTs
                else:  # a shallower model against a deeper ViT (the study's question), or equal depth, other FLOPs
                    flops_differ = abs(math.log(ref["flops"] / row["flops"])) > flops_tolerance
                    wanted = ref["depth"] > row["depth"] or (ref["depth"] == row["depth"] and flops_differ)
                if wanted:
                    out.append(f"[{setting}] {flops_sentence(row, ref)}")
    return list(dict.fromkeys(out))


COLUMNS = (
    ("setting", "setting"),
    ("model", "model"),
    ("depth", "depth"),
    ("seeds", "seeds"),
    ("diverged", "diverged"),
    ("batch", "batch"),
    ("acc", "final acc"),
    ("params", "params"),
    ("mflops", "MFLOPs/img"),
    ("t_train", "T(train) s/epoch"),
    ("t_test", "T(test) s/epoch"),
    ("t_precise", "T(PreciseBN) s/epoch"),
    ("ref", "vs"),
    ("r_t", "r_t"),
    ("g_t", "g_t"),
    ("r_v", "r_v"),
    ("g_v", "g_v"),
    ("flops_ratio", "FLOPs ratio"),
    ("t97", "time to 97%"),
    ("t98", "time to 98%"),
)


def _num(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _reach(row: dict, col: str) -> str:
    n, runs = row[f"{col}_n"], row["runs"]
    if n == 0:
        return "not reached"
    return f"{row[col]:.1f} s" + ("" if n == runs else f" ({n}/{runs} runs)")


def format_acc(mean: float, std: float, lo: float, hi: float, n: int) -> str:
    """``"97.80% ± 0.99 (95% CI 88.91-100.00)"`` in percent: mean ± sample std and the t-interval of the mean, for
    more than one run (the interval cut to [0, 100%]); the mean alone for one; "-" for none."""
    if n == 0 or math.isnan(mean):
        return "-"
    text = f"{mean * 100:.2f}%"
    if n > 1:
        text += f" ± {std * 100:.2f} (95% CI {max(lo, 0.0) * 100:.2f}-{min(hi, 1.0) * 100:.2f})"
    return text


def format_cells(table: pd.DataFrame) -> list[list[str]]:
    """The table as display strings, in ``COLUMNS`` order (accuracy as ``format_acc``)."""
    cells = []
    for row in table.to_dict("records"):
        acc = format_acc(row["acc_mean"], row["acc_std"], row["acc_lo"], row["acc_hi"], row["runs"])
        values = {
            "setting": str(row["setting"]),
            "model": DISPLAY.get(row["model"], row["model"]),
            "depth": str(row["depth"]),
            "seeds": str(row["seeds"]),
            "diverged": str(row["diverged"]) + (f" (+{row['unfinished']} unfinished)" if row["unfinished"] else ""),
            "batch": row["batch"] or "-",
            "acc": acc,
            "params": f"{int(row['params']):,}",
            "mflops": _num(row["flops"] / 1e6, ".2f"),
            "t_train": _num(row["t_train"], ".3f"),
            "t_test": _num(row["t_test"], ".3f"),
            "t_precise": _num(row.get("t_precise", math.nan), ".3f"),
            "ref": row["ref"] or "-",
            "r_t": _num(row["r_t"], ".2f"),
            "g_t": _num(row["g_t"], ".1f") + ("%" if not math.isnan(row["g_t"]) else ""),
            "r_v": _num(row["r_v"], ".2f"),
            "g_v": _num(row["g_v"], ".1f") + ("%" if not math.isnan(row["g_v"]) else ""),
            "flops_ratio": _num(row["flops_ratio"], ".2f"),
            "t97": _reach(row, "t97"),
            "t98": _reach(row, "t98"),
        }
        cells.append([values[key] for key, _ in COLUMNS])
    return cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """A GitHub Markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def selection_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The learning rate chosen on the validation split, per model: one row per (model, depth) of the sweep with
    ``val_<lr>`` (mean final validation accuracy of the finished runs at that lr; NaN when none finished),
    ``diverged_<lr>``, the ``chosen_lr`` (highest mean validation accuracy over all its runs, a diverged or
    unfinished run counting 0, so an lr that fails for a seed is rarely chosen) and the test accuracy at that lr over
    its finished seeds (``test_mean``, ``test_std``, ``test_lo``, ``test_hi``, ``seeds``). Empty when the runs have no
    validation accuracy (no validation split) or sweep a single lr."""
    sweep = runs[runs["phase"] == "sweep"] if "phase" in runs else runs
    if sweep.empty or "val_acc" not in sweep or sweep["val_acc"].isna().all() or sweep["lr"].nunique() < 2:
        return pd.DataFrame()
    lrs = sorted(sweep["lr"].unique())
    status = sweep["status"] if "status" in sweep else pd.Series("finished", index=sweep.index)
    rows = []
    for (model, depth), group in sweep.groupby(["model", "depth"], sort=False):
        row: dict = {"model": model, "depth": int(depth), "label": group["label"].iloc[0]}
        score = {}
        for lr in lrs:
            at = group[group["lr"] == lr]
            ok = status[at.index] == "finished"
            row[f"val_{lr:g}"] = at["val_acc"][ok].mean() if ok.any() else math.nan
            row[f"diverged_{lr:g}"] = int((status[at.index] == "diverged").sum())
            if ok.any():
                score[lr] = float(at["val_acc"].where(ok, 0.0).fillna(0.0).mean())
        chosen = max(score, key=score.get) if score else math.nan
        row["chosen_lr"] = chosen
        done = group[(group["lr"] == chosen) & (status[group.index] == "finished")] if score else group.iloc[:0]
        row["test_mean"], row["test_std"], row["test_lo"], row["test_hi"] = mean_interval(done["final_acc"])
        row["seeds"] = int(done["seed"].nunique())
        rows.append(row)
    return pd.DataFrame(rows)


def selection_cells(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """``selection_table`` as a header and display strings."""
    lrs = [c[4:] for c in table.columns if c.startswith("val_")]
    header = ["model", "depth", *[f"val acc, lr {lr}" for lr in lrs], "chosen lr", "seeds", "test acc at chosen lr"]
    cells = []
    for row in table.to_dict("records"):
        vals = []
        for lr in lrs:
            v, div = row[f"val_{lr}"], row[f"diverged_{lr}"]
            text = "-" if math.isnan(v) else f"{v * 100:.2f}%"
            vals.append(text + (f" ({div} diverged)" if div else ""))
        chosen = "-" if math.isnan(row["chosen_lr"]) else f"{row['chosen_lr']:g}"
        test = format_acc(row["test_mean"], row["test_std"], row["test_lo"], row["test_hi"], row["seeds"])
        cells.append(
            [DISPLAY.get(row["model"], row["model"]), str(row["depth"]), *vals, chosen, str(row["seeds"]), test]
        )
    return header, cells


EPOCH_SELECTION_HEADER = ["run", "lr", "seed", "chosen epoch", "of", "val acc (chosen)", "test acc (chosen)",
                          "test acc (last)"]  # fmt: skip


def epoch_selection_cells(runs: pd.DataFrame) -> list[list[str]]:
    """One row per run that chose an epoch on its validation split (``best_epoch``, from ``best/epoch``): the
    epoch, the run's epochs, validation and test accuracy of that checkpoint, and the last epoch's test accuracy.
    Empty when no run chose one (no validation split, or runs logged before selection existed)."""
    if "best_epoch" not in runs:
        return []

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    chose = runs[runs["best_epoch"].notna()]
    return [[r["label"], f"{r['lr']:g}", str(int(r["seed"])), f"{r['best_epoch']:.0f}", str(int(r["epochs"])),
             pct(r["best_val_acc"]), pct(r["best_test_acc"]), pct(r["final_acc"])]
            for _, r in chose.iterrows()]  # fmt: skip


def selection_sentences(runs: pd.DataFrame, lr_table: pd.DataFrame) -> list[str]:
    """Which split chose what, for any run set: the learning rate (``lr_table``: ``selection_table``'s), the epoch,
    and what the test set was used for."""
    has_val = "val_acc" in runs and runs["val_acc"].notna().any()
    every_epoch = "test_every_epoch" in runs and runs["test_every_epoch"].any()
    chose_epoch = "best_epoch" in runs and runs["best_epoch"].notna().any()
    out = []
    if not lr_table.empty:
        out.append("Learning rate: chosen on the validation split (mean final validation accuracy over seeds).")
    elif runs["lr"].nunique() > 1 and not has_val:
        out.append("Learning rate: not chosen (no validation split); every rate is shown, none is a selection.")
    if chose_epoch:
        out.append("Epoch: chosen on the validation split (its best epoch, kept as best.pt); the test set was read "
                   "once for that checkpoint (test acc (chosen)).")  # fmt: skip
    elif has_val:
        out.append("Epoch: not chosen; the accuracy reported is the last epoch's.")
    if every_epoch:
        out.append("Test set: evaluated after every epoch (the study's practice), so any best-over-epochs figure "
                   "is chosen on the test set and optimistic; it selects nothing here.")  # fmt: skip
    elif has_val:
        out.append("Test set: read once, at the end; it chose nothing.")
    return out
