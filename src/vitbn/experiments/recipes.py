"""``vitbn experiment recipes``: Touvron et al.'s (2022) architecture recipes trained side by side.

The runs are an lr sweep of one learning rate over the recipe variants (``presets._recipe_models``), so they are
nested MLflow runs that resume like any sweep. The report reads them back from MLflow and adds what training
does not measure: each variant's latency at batch 1 (eval mode, fp32, eager, the variants timed in interleaved
rounds on this machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.experiments.runs import mlflow_client, resolve_parent
from vitbn.provenance import Provenance, current
from vitbn.report.build import runs_sentence
from vitbn.report.runs import load_run_set, model_config_from_params
from vitbn.report.tables import markdown_table, per_epoch_median

HEADER = ["model", "recipe", "stages x branches", "stem / patch", "params", "MFLOPs/img", "final acc", "best acc",
          "T(train) s/epoch", "T(test) s/epoch", "latency b1 ms"]  # fmt: skip
RECIPE_NAMES = {"seq6": "sequential", "par3x2": "parallel 3x2", "ls": "+ LayerScale 0.1", "dp0.1": "+ stoch. depth 0.1",
                "linear4": "linear stem", "hmlp4": "hMLP stem"}  # fmt: skip


@dataclass
class RecipesReport:
    table: pd.DataFrame
    markdown: Path
    figure: Path


def batch1_latency(configs: dict[str, object], repeats: int = 7, min_repeat_s: float = 0.2) -> dict[str, float]:
    """Milliseconds per batch-1 forward pass of each config's model (eval, fp32, eager, CPU), median over
    interleaved rounds."""
    from vitbn.bench.cases import eval_img_s
    from vitbn.models import build_model

    img_s = eval_img_s({label: build_model(c) for label, c in configs.items()}, 1, repeats, min_repeat_s)
    return {label: 1000.0 / value for label, value in img_s.items()}


def recipes_table(runs: pd.DataFrame, history: pd.DataFrame, latency: dict[str, float]) -> pd.DataFrame:
    """One row per variant (label), mean over seeds."""
    rows = []
    for label, group in runs.groupby("label", sort=False):
        h = history[history["run_id"].isin(group["run_id"])]
        per_run = [hh for _, hh in h.groupby("run_id")]
        first = group.iloc[0]
        rows.append({
            "label": label, "model": first["model"], "recipe": label.split("-", 1)[1],
            "params": int(first["params"]), "flops": int(first["flops"]),
            "final_acc": group["final_acc"].mean(),
            "best_acc": sum(hh["acc"].max() for hh in per_run) / max(len(per_run), 1),
            "t_train": sum(per_epoch_median(hh["train_s"], hh["epoch"]) for hh in per_run) / max(len(per_run), 1),
            "t_test": sum(per_epoch_median(hh["test_s"], hh["epoch"]) for hh in per_run) / max(len(per_run), 1),
            "latency_ms": latency.get(label, math.nan), "seeds": len(group), "status": ",".join(group["status"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _cells(table: pd.DataFrame, configs: dict) -> list[list[str]]:
    out = []
    for _, r in table.iterrows():
        c = configs[r["label"]]
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        out.append([
            "ViT" if r["model"] == "vit" else "ViTBN" if r["model"] == "vitbn" else r["model"],
            RECIPE_NAMES.get(r["recipe"], r["recipe"]), f"{c.depth} x {c.parallel}", f"{c.stem} / {patch}",
            f"{r['params']:,}", f"{r['flops'] / 1e6:.2f}",
            f"{100 * r['final_acc']:.2f}%", f"{100 * r['best_acc']:.2f}%",
            f"{r['t_train']:.2f}", f"{r['t_test']:.2f}", f"{r['latency_ms']:.2f}",
        ])  # fmt: skip
    return out


def _figure(table: pd.DataFrame, history: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models) + 2, figsize=(5 * (len(models) + 2), 4))
    merged = history.merge(runs[["run_id", "label", "model"]], on="run_id")
    for ax, model in zip(axes, models):
        for label, h in merged[merged["model"] == model].groupby("label", sort=False):
            mean = h.groupby("epoch")["acc"].mean()
            ax.plot(mean.index, 100 * mean.values, marker="o", label=label.split("-", 1)[1])
        ax.set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="%")
        ax.legend(fontsize=8)
    for ax, column, title in ((axes[-2], "t_train", "train s/epoch"), (axes[-1], "latency_ms", "latency b1 (ms)")):
        ax.barh(table["label"], table[column])
        ax.set(title=title)
        ax.invert_yaxis()
    return save_figure(fig, path)


def provenance(made: Provenance, runs: pd.DataFrame, measured: str = "the latency column",
               when: str = "measured when this report was built") -> str:  # fmt: skip
    """What made the page (``made``: taken before the page's files are written, so that they do not count as
    uncommitted changes), where the runs trained (their tags) and that ``measured`` (``when``) comes from the page's
    machine."""
    return f"{made.line()} {runs_sentence(runs)} The rest, {measured}: {when}, on the page's machine."


def load_experiment(key: str, tracking_uri: str | None = None):
    """The tracked experiment whose parent run is ``key`` (id or name): ``(client, parent, runs, configs)``, with
    ``runs`` its ``RunSet`` and ``configs`` each label's ``ModelConfig`` (from its first run's params)."""
    client = mlflow_client(tracking_uri)
    parent = resolve_parent(client, key, None)
    runs = load_run_set(client, parent)
    configs = {}
    for run_id, label in zip(runs.runs["run_id"], runs.runs["label"]):
        configs.setdefault(label, model_config_from_params(client.get_run(run_id).data.params))
    return client, parent, runs, configs


def save_figure(fig, path: Path, tight: str = "layout") -> Path:
    """Writes an experiment report's figure as PNG (100 dpi) and closes it: ``tight="layout"`` lays it out first,
    ``"bbox"`` crops to what is drawn (a figure with a shared colorbar)."""
    import matplotlib.pyplot as plt

    if tight == "layout":
        fig.tight_layout()
    fig.savefig(path, dpi=100, **({"bbox_inches": "tight"} if tight == "bbox" else {}))
    plt.close(fig)
    return path


def write_report(client, parent, out: Path, body: list[str], figure: Path) -> Path:
    """``out/report.md``: the parent's name and description, then ``body`` and the figure; both files are logged
    to the parent run under ``report/``."""
    text = [f"# {parent.info.run_name}", "", parent.data.tags.get("vitbn.description", ""), "", *body, "",
            f"![{figure.stem}]({figure.name})", ""]  # fmt: skip
    markdown = out / "report.md"
    markdown.write_text("\n".join(text))
    for path in (markdown, figure):
        client.log_artifact(parent.info.run_id, str(path), "report")
    return markdown


def build_recipes_report(key: str, out_dir: str | Path, *, tracking_uri: str | None = None) -> RecipesReport:
    """The recipes table (Markdown) and figure of the experiment whose parent run is ``key`` (id or name)."""
    made = current()
    client, parent, runs, configs = load_experiment(key, tracking_uri)
    table = recipes_table(runs.runs, runs.history, batch1_latency(configs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = _figure(table, runs.history, runs.runs, out / "recipes.png")
    body = [
        provenance(made, runs.runs), "",
        markdown_table(HEADER, _cells(table, configs)), "",
        "final/best acc: test accuracy after the last epoch / best over epochs (mean over seeds); T: median seconds "
        "per epoch (epoch 1 excluded when there are more than 2); latency: one eval-mode forward pass of a single "
        "image, fp32, eager, median of interleaved rounds, measured when the report was built.",
    ]  # fmt: skip
    return RecipesReport(table, write_report(client, parent, out, body, figure), figure)
