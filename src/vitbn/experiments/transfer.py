"""``vitbn experiment transfer``: pre-train on MNIST, then learn a small dataset from scratch or by fine-tuning
(Steiner et al. 2021: transfer beats training from scratch on small data; Touvron et al. 2022: fine-tuning the
attention layers alone is almost as good as fine-tuning everything, at a fraction of the memory and the weights
to store).

The preset's models are pre-trained (phase ``pretrain``: an lr sweep child like any other). Then, for every
target dataset and model, each ``MODES`` entry is one child (phase ``transfer``): ``scratch`` (a new model),
``scratch+augreg`` (a new model with the light AugReg level, dropout and stochastic depth 0.1) and the fine-tuning
of the pre-trained model's ``all`` / ``attn`` / ``ffn`` / ``head`` parameters (``vitbn.engine.finetune``). Every
child holds out a stratified 10% of the target's training images; the epoch of best validation accuracy is the
one whose test accuracy is reported (``best/test_acc``). Targets are resized to the pre-training image size
(bilinear, antialiased; scikit-learn's 8x8 digits become 28x28), so the patch grid and position embeddings match.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vitbn.experiments.presets import ExperimentPreset
from vitbn.experiments.runner import open_experiment, run_name
from vitbn.experiments.runs import child_tags

log = logging.getLogger(__name__)
KIND = "transfer"
MODES = ("scratch", "scratch+augreg", "all", "attn", "ffn", "head")
FINETUNE_MODES = ("all", "attn", "ffn", "head")
AUGREG = {"augment": {"level": "light"}, "model": {"dropout": 0.1, "drop_path": 0.1}}
HEADER = ["model", "target", "training", "val acc", "test acc", "best epoch", "trainable params", "peak step MiB",
          "step ms", "stored MiB (delta / full)"]  # fmt: skip


@dataclass
class TransferReport:
    table: pd.DataFrame
    markdown: Path
    figure: Path


@dataclass
class TransferPlan:
    """The target phase of a transfer preset: datasets, their image size, the epochs and lr of every target run."""

    targets: tuple[str, ...] = ("digits",)
    image_size: int = 28
    epochs: int = 15
    lr: float = 5e-4
    val_fraction: float = 0.1
    target_subset: int | None = None  # the first N training images of each target (None: all)


# The target phase of each transfer preset.
PLANS = {
    "transfer": TransferPlan(),
    "transfer-full": TransferPlan(targets=("digits", "fashion-mnist", "kmnist"), epochs=30, target_subset=5000),
}


def target_config(preset: ExperimentPreset, spec, target: str, mode: str, plan: TransferPlan, seed: int):
    """The RunConfig of one target run: the preset's shared settings on the target dataset (stratified validation
    split, test set once at the end), the plan's epochs and lr, AugReg for ``scratch+augreg``."""
    changed = copy.deepcopy(preset)
    changed.run["data"] = {**changed.run.get("data", {}), "dataset": target, "train_subset": plan.target_subset,
                           "test_subset": None, "val_size": 0, "val_fraction": plan.val_fraction,
                           "test_every_epoch": False}  # fmt: skip
    changed.run["train"] = {**changed.run.get("train", {}), "epochs": plan.epochs}
    extra = AUGREG if mode == "scratch+augreg" else {}
    spec = copy.deepcopy(spec)
    spec.overrides.update(extra.get("model", {}))
    if extra:
        changed.run["augment"] = dict(extra["augment"])
    config = changed.base_config(spec, lr=plan.lr, seed=seed)
    config.model.image_size = plan.image_size
    return config


def run_transfer(preset: ExperimentPreset, plan: TransferPlan | None = None, *, progress: str = "auto"):
    """Pre-trains every model of ``preset`` (its first lr, every seed), then trains every (target, mode) of
    ``plan``; children done are skipped, interrupted ones resumed. Returns the parent run and the children's
    results (a ``SweepResult``)."""
    from vitbn.engine.checkpoint import MODEL_NAME
    from vitbn.experiments.lr_sweep import SweepResult

    plan = plan or PLANS.get(preset.name, TransferPlan())
    exp = open_experiment(KIND, preset, progress=progress)
    with exp.closing():
        for seed in preset.seeds:
            for spec in preset.models:
                base = preset.base_config(spec, lr=preset.lrs[0], seed=seed)
                tc = base.train
                tags = child_tags("pretrain", spec.label, spec.name, spec.depth, tc.lr, tc.batch_size, seed, tc.epochs)
                pre = exp.run_child(base, tags)
                base_file = exp.out_dir / run_name(tags) / MODEL_NAME
                log.info("pretrain %s seed=%d: %s (%s)", spec.label, seed, pre.status, pre.action)
                for target in plan.targets:
                    for mode in MODES:
                        _target_child(exp, preset, spec, target, mode, plan, seed, base_file)
    return SweepResult(exp.parent_id, exp.results)


def _target_child(exp, preset, spec, target, mode, plan, seed, base_file: Path) -> None:
    config = target_config(preset, spec, target, mode, plan, seed)
    tc = config.train
    label = f"{spec.label}-{target}-{mode}"
    tags = child_tags("transfer", label, spec.name, spec.depth, tc.lr, tc.batch_size, seed, tc.epochs)
    if mode in FINETUNE_MODES:
        from vitbn.engine.finetune import finetune

        def train(config, *, tracker, parent_run_id, progress):
            return finetune(base_file, config, part=mode, tracker=tracker, parent_run_id=parent_run_id,
                            image_size=plan.image_size, progress=progress)  # fmt: skip
    else:
        from vitbn.data import prepare_data
        from vitbn.engine import fit
        from vitbn.engine.adapt import resize_data

        def train(config, *, tracker, parent_run_id, progress):  # a new model, on the images resized as above
            data = resize_data(prepare_data(config.data), plan.image_size)
            return fit(config, tracker=tracker, parent_run_id=parent_run_id, data=data, progress=progress)

    result = exp.run_child(config, tags, train=train)
    log.info("%s seed=%d: %s (%s)", label, seed, result.status, result.action)


def transfer_table(runs: pd.DataFrame, metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per finished transfer run: model, target, mode, the best epoch's validation and test accuracy and,
    for fine-tuning, the measurements of ``finetune`` (``metrics``: run id -> its metrics)."""
    rows = []
    done = runs[(runs["phase"] == "transfer") & (runs["status"] == "finished")]
    for _, r in done.iterrows():
        m = metrics.get(r["run_id"], {})
        rest = r["label"].removeprefix(f"{r['model']}-d{r['depth']}-")  # "<target>-<mode>"
        mode = next(m for m in sorted(MODES, key=len, reverse=True) if rest.endswith(f"-{m}"))
        model, target = r["model"], rest[: -len(mode) - 1]
        rows.append({"model": model, "target": target, "mode": mode, "run_id": r["run_id"],
                     "val_acc": m.get("best/val_acc", math.nan), "test_acc": m.get("best/test_acc", math.nan),
                     "best_epoch": m.get("best/epoch", math.nan),
                     "trainable": m.get("finetune/trainable_params", r["params"]),
                     "memory_mb": m.get("finetune/peak_step_memory_mb", math.nan),
                     "step_ms": m.get("finetune/step_time_ms", math.nan),
                     "delta_mb": m.get("finetune/delta_mb", math.nan),
                     "full_mb": m.get("finetune/full_mb", math.nan)})  # fmt: skip
    order = {mode: i for i, mode in enumerate(MODES)}
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["model", "target", "mode"], key=lambda c: c.map(order) if c.name == "mode" else c)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if math.isfinite(x) else "-"


def _num(x: float, fmt: str) -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _cells(table: pd.DataFrame) -> list[list[str]]:
    rows = []
    for _, r in table.iterrows():
        stored = f"{_num(r['delta_mb'], '{:.3f}')} / {_num(r['full_mb'], '{:.3f}')}"
        rows.append([r["model"], r["target"], r["mode"], _pct(r["val_acc"]), _pct(r["test_acc"]),
                     _num(r["best_epoch"], "{:.0f}"), f"{int(r['trainable']):,}", _num(r["memory_mb"], "{:.1f}"),
                     _num(r["step_ms"], "{:.1f}"), stored])  # fmt: skip
    return rows


def verdicts(table: pd.DataFrame) -> list[str]:
    """Per model and target: transfer (fine-tuning everything) against the better of the scratch runs, and the
    attention-only fine-tuning against the full one (accuracy, memory, step time, stored weights)."""
    out = []
    for (model, target), g in table.groupby(["model", "target"], sort=False):
        by = g.set_index("mode")
        if {"all", "scratch", "scratch+augreg"} <= set(by.index):
            scratch = max(by.loc["scratch", "test_acc"], by.loc["scratch+augreg", "test_acc"])
            gain = 100 * (by.loc["all", "test_acc"] - scratch)
            out.append(f"{model} on {target}: fine-tuning everything reaches {_pct(by.loc['all', 'test_acc'])}, "
                       f"{gain:+.2f} points over the better scratch run ({_pct(scratch)}).")  # fmt: skip
        if {"all", "attn"} <= set(by.index):
            a, f = by.loc["attn"], by.loc["all"]
            out.append(f"{model} on {target}: attention-only {_pct(a['test_acc'])} against {_pct(f['test_acc'])} "
                       f"for everything ({100 * (a['test_acc'] - f['test_acc']):+.2f} points), with "
                       f"{a['trainable'] / f['trainable']:.0%} of the trainable parameters, "
                       f"{_ratio(a['memory_mb'], f['memory_mb'])} of the peak step memory, "
                       f"{_ratio(a['step_ms'], f['step_ms'])} of the step time and "
                       f"{_ratio(a['delta_mb'], f['delta_mb'])} of the stored weights.")  # fmt: skip
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if math.isfinite(a) and math.isfinite(b) and b else "-"


def build_transfer_report(key: str, out_dir: str | Path, *, tracking_uri: str | None = None):
    """The transfer table and verdicts (Markdown) and a bar figure of the experiment whose parent run is ``key``."""
    from vitbn.experiments.recipes import load_experiment, write_report
    from vitbn.provenance import current
    from vitbn.report.build import runs_sentence
    from vitbn.report.tables import markdown_table

    made = current()
    client, parent, runs, _ = load_experiment(key, tracking_uri)
    metrics = {run_id: dict(client.get_run(run_id).data.metrics) for run_id in runs.runs["run_id"]}
    table = transfer_table(runs.runs, metrics)
    pre = runs.runs[runs.runs["phase"] == "pretrain"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = _figure(table, out / "transfer.png")
    pre_lines = [f"- pre-trained {r['label']} on MNIST: test {_pct(r['final_acc'])}" for _, r in pre.iterrows()]
    body = [
        f"{made.line()} {runs_sentence(runs.runs)}", "", *pre_lines, "",
        markdown_table(HEADER, _cells(table)), "",
        "val / test acc: at the epoch of best accuracy on the run's validation split (a stratified 10% of the target's "
        "training images; the test set read once, for that epoch); trainable params: what the optimizer updates "
        "(scratch: the whole model); peak step MiB and step ms: one training step at the run's batch, measured "
        "before training (the method is the run's `finetune.memory_method` param); stored: the delta checkpoint "
        "(the tensors fine-tuning changed) and the full model.", "",
        *[f"- {v}" for v in verdicts(table)], "",
        *[f"Note: {n}" for n in runs.notes],
    ]  # fmt: skip
    return TransferReport(table, write_report(client, parent, out, body, figure), figure)


def _figure(table: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitbn.experiments.recipes import save_figure

    groups = list(table.groupby(["model", "target"], sort=False))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.5 * max(1, len(groups)), 3.5), squeeze=False)
    for ax, ((model, target), g) in zip(axes[0], groups):
        ax.barh(list(g["mode"]), 100 * g["test_acc"])
        lo = max(0.0, 100 * float(g["test_acc"].min()) - 5)
        ax.set(title=f"{model} on {target}", xlabel="test acc % (best val epoch)", xlim=(lo, 100))
        ax.invert_yaxis()
    return save_figure(fig, path)
