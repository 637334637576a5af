"""``vitbn experiment sam``: Adam against Adam + SAM on ViT (LayerNorm) and ViTBN, then ``vitbn analyze`` of
each trained model (Chen, Hsieh and Gong 2021: sharpness, active neurons, attention).

The runs are an lr sweep of the preset's model entries (labels ``<model>-adam`` and ``<model>-sam``), nested
MLflow runs that resume like any sweep. The report analyses each run's ``model.pt`` into ``analysis/`` of its run
folder (kept: a rebuilt report with the same analysis options reads it back), logs the analysis to the run, and
tabulates training and geometry side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vitbn.analysis.run import RESULT_NAME, AnalyzeOptions
from vitbn.errors import UserError
from vitbn.experiments.recipes import load_experiment, provenance, write_report
from vitbn.provenance import current
from vitbn.report.tables import markdown_table, per_epoch_median

# The analysis budget of the CPU preset (about 4-6 minutes a model on one core) and of ``--full``.
ANALYSIS = AnalyzeOptions(images=1024, max_iter=30, block_max_iter=6, attention_images=4, landscape_points=11)
ANALYSIS_FULL = AnalyzeOptions()
HEADER = ["model", "optimizer", "test acc", "train loss", "T(train) s/epoch", "λmax", "λmax embed",
          "λmax block1 attn", "λmax block1 mlp", "active block1", "active mean"]  # fmt: skip
FIGURE_IMAGES = 2  # test images per row of the attention figure


@dataclass
class SamReport:
    table: pd.DataFrame
    markdown: Path
    figure: Path


def run_folder(client, run_id: str) -> Path:
    """The folder ``vitbn train`` wrote the run's model into (``train.out_dir`` / run name)."""
    run = client.get_run(run_id)
    folder = Path(run.data.params.get("train.out_dir", "runs")) / run.info.run_name
    if not (folder / "model.pt").is_file():
        raise UserError(f"run {run.info.run_name} has no model file {folder / 'model.pt'} (run the experiment from "
                        "the folder it was trained in)")  # fmt: skip
    return folder


def ensure_analysis(client, run_id: str, options: AnalyzeOptions, tracking_uri: str | None) -> dict:
    """The analysis of run ``run_id``'s model with ``options``: read back from ``analysis/analysis.json`` when it
    was made with the same options, else computed (on the GPU when there is one), written there and logged to the
    run."""
    from vitbn.analysis.run import analyze_checkpoint
    from vitbn.analysis.tracking import log_analysis
    from vitbn.engine.device import resolve_device

    folder = run_folder(client, run_id)
    path = folder / "analysis" / RESULT_NAME
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError:
            found = {}
        if found.get("options") == asdict(options):
            return found
    result, out, _ = analyze_checkpoint(folder, options, device=resolve_device("auto"), progress=True)
    log_analysis(run_id, tracking_uri, result, out)
    return result


def optimizer_name(params: dict[str, str]) -> str:
    """``Adam``, ``Adam + SAM ρ=0.05`` or ``Adam + ASAM ρ=…`` from a run's params."""
    base = params.get("train.optimizer", "adam")
    base = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}.get(base, base)
    rho = params.get("train.sam_rho", "None")
    if rho in ("None", ""):
        return base
    kind = "ASAM" if params.get("train.sam_adaptive") == "True" else "SAM"
    return f"{base} + {kind} ρ={float(rho):g}"


def sam_table(runs: pd.DataFrame, history: pd.DataFrame, analyses: dict[str, dict], names: dict[str, str]):
    """One row per label: training (final test acc and train loss, median train s/epoch) and analysis (λmax whole,
    embed, block1 attn/mlp; active fraction block1 and mean), each the mean over the label's runs (seeds)."""
    rows = []
    for label, group in runs.groupby("label", sort=False):
        ids = list(group["run_id"])
        per_run = [history[history["run_id"] == i].sort_values("epoch") for i in ids]
        found = [analyses[i] for i in ids]

        def mean(values) -> float:
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else math.nan

        def block(a, name):
            entry = a["hessian"]["blocks"].get(name)
            return entry["lambda_max"] if entry else None

        rows.append({
            "label": label, "model": group.iloc[0]["model"], "optimizer": names[ids[0]],
            "test_acc": group["final_acc"].mean(),
            "train_loss": mean([h["train_loss"].iloc[-1] for h in per_run if len(h)]),
            "t_train": mean([per_epoch_median(h["train_s"], h["epoch"]) for h in per_run if len(h)]),
            "lambda_max": mean([a["hessian"]["lambda_max"] for a in found]),
            "converged": all(a["hessian"]["converged"] for a in found),
            "lambda_embed": mean([block(a, "embed") for a in found]),
            "lambda_block1_attn": mean([block(a, "block1.attn") for a in found]),
            "lambda_block1_mlp": mean([block(a, "block1.mlp") for a in found]),
            "active_block1": mean([a["active_fraction"].get("block1") for a in found]),
            "active_mean": mean([a["active_fraction"]["mean"] for a in found]),
            "seeds": len(group), "status": ",".join(group["status"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _cells(table: pd.DataFrame) -> list[list[str]]:
    out = []
    for _, r in table.iterrows():
        model = {"vit": "ViT (LN)", "vitbn": "ViTBN"}.get(r["model"], r["model"])
        lam = f"{r['lambda_max']:.3g}{'' if r['converged'] else '*'}"
        geometry = [f"{r[k]:.3g}" for k in ("lambda_embed", "lambda_block1_attn", "lambda_block1_mlp")]
        activity = [f"{r[k]:.3f}" for k in ("active_block1", "active_mean")]
        out.append([model, r["optimizer"], f"{100 * r['test_acc']:.2f}%", f"{r['train_loss']:.4f}",
                    f"{r['t_train']:.1f}", lam, *geometry, *activity])  # fmt: skip
    return out


def _seeds(table: pd.DataFrame) -> str:
    counts = sorted(set(table["seeds"]))
    return "one seed" if counts == [1] else f"mean over {'/'.join(map(str, counts))} seeds"


def attention_figure(rows: list[tuple[str, Path]], path: Path, images: int = FIGURE_IMAGES) -> Path:
    """One row per model (``(title, analysis folder)``): for each of the first ``images`` test images its first
    and last layer's attention of the pooled token (head mean) and the rollout, drawn over the image."""
    from vitbn.analysis import figures

    plt = figures.plt
    arrays = [np.load(folder / "attention.npz") for _, folder in rows]
    images = min([images, *(len(a["images"]) for a in arrays)])
    kinds = ("layer 1", "last layer", "rollout")
    cols = images * len(kinds)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * figures.CELL + 1.5, len(rows) * figures.CELL + 0.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    for r, ((title, _), a) in enumerate(zip(rows, arrays)):
        for i in range(images):
            maps = (a["layer_maps"][i, 0], a["layer_maps"][i, -1], a["rollout"][i])
            for k, (kind, patch_map) in enumerate(zip(kinds, maps)):
                ax = axes[r, i * len(kinds) + k]
                figures.overlay(ax, a["images"][i], patch_map, f"test #{i}: {kind}" if r == 0 else None)
        axes[r, 0].set_ylabel(title, fontsize=8)
    pooled = {figures.pooled_name(json.loads((f / RESULT_NAME).read_text())["attention"]["class_token"])
              for _, f in rows}  # fmt: skip
    fig.suptitle(f"attention of the {' / '.join(sorted(pooled))} over the patches (head mean)", fontsize=10)
    return figures.save_png(fig, path)


def build_sam_report(
    key: str, out_dir: str | Path, *, tracking_uri: str | None = None, options: AnalyzeOptions = ANALYSIS
) -> SamReport:
    """Analyses every model of the experiment whose parent run is ``key`` (id or name) that has no analysis with
    ``options`` yet, then writes the table (Markdown) and the attention figure into ``out_dir``."""
    made = current()
    client, parent, runs, _ = load_experiment(key, tracking_uri)
    analyses, names, folders = {}, {}, {}
    for run_id in runs.runs["run_id"]:
        analyses[run_id] = ensure_analysis(client, run_id, options, tracking_uri)
        names[run_id] = optimizer_name(client.get_run(run_id).data.params)
        folders[run_id] = run_folder(client, run_id) / "analysis"
    table = sam_table(runs.runs, runs.history, analyses, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = runs.runs.drop_duplicates("label")  # the figure shows each label's first run (seed)
    titles = dict(zip(table["label"], (f"{m} {o}" for m, o, *_ in _cells(table))))
    figure = attention_figure([(titles[lb], folders[i]) for lb, i in zip(first["label"], first["run_id"])],
                              out / "sam_attention.png")  # fmt: skip
    o = options
    budget = (f"`vitbn analyze` with --images {o.images} --max-iter {o.max_iter} --block-max-iter "
              f"{o.block_max_iter or o.max_iter} --tol {o.tol:g} --landscape-points {o.landscape_points}, BN "
              f"{o.bn_mode} mode")  # fmt: skip
    body = [
        provenance(made, runs.runs, f"the analysis columns ({budget})",
                   "computed by the first report that needed them (later reports read them back from analysis/)"),
        "",
        markdown_table(HEADER, _cells(table)), "",
        f"test acc / train loss: after the last epoch ({_seeds(table)}); T(train): median seconds per training epoch "
        "(epoch 1 excluded when there are more than 2), both passes of SAM included; λmax: the largest eigenvalue "
        "of the Hessian of the mean training cross-entropy over the first training images, by power iteration "
        "(* not converged at the cap: a lower estimate); per block: the same with the other parameters fixed "
        "(embed: the patch embedding); active: the fraction of GELU inputs > 0 in the MLP. Each model's files "
        "(analysis.json, blocks.png, landscape.png, attention maps) are in analysis/ of its run folder and "
        "logged to its MLflow run.",
    ]  # fmt: skip
    return SamReport(table, write_report(client, parent, out, body, figure), figure)
