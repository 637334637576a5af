"""The BatchNorm consistency study (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021, Sec. 3-4).

For a trained model and a range of normalization batch sizes (NBS), the error in % of:

- ``train_batch``: mini-batch statistics (BatchNorm in training mode, statistics of each group of NBS images)
  on training data;
- ``val_batch``: the same on validation data;
- ``val_ema``: population statistics on validation data, the model's running (EMA) statistics;
- ``val_precise``: population statistics on validation data, recomputed exactly on training data by
  ``recompute_bn_stats`` with BatchNorm normalizing groups of NBS images during the passes (the statistics of
  later layers depend on how earlier layers normalized).

Groups of NBS images are formed with ghost BN inside larger batches (``set_ghost_batch_size``): the same
computation as separate batches of NBS images, in fewer forward passes. Images that do not fill a group are
left out, so every group has exactly NBS images.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.bn.ghost import set_ghost_batch_size
from vitbn.bn.precise import recompute_bn_stats
from vitbn.data import InMemoryLoader, Split
from vitbn.errors import UserError
from vitbn.models.norms import TokenBatchNorm

KINDS = {
    "train_batch": "mini-batch stats, train data",
    "val_batch": "mini-batch stats, val data",
    "val_ema": "population stats (EMA), val data",
    "val_precise": "population stats (precise), val data",
}
COLUMNS = ("nbs", *KINDS, "train_images", "val_images", "precise_images")
MAX_NBS = 1024


def default_nbs(limit: int) -> list[int]:
    """2, 4, ..., 1024, capped at ``limit`` images."""
    return [2**k for k in range(1, 11) if 2**k <= min(limit, MAX_NBS)]


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, TokenBatchNorm))


def _with_batch_stats(model: nn.Module, nbs: int) -> nn.Module:
    """A copy in eval mode except its BatchNorms, which normalize groups of ``nbs`` images."""
    model = copy.deepcopy(model).eval()
    set_ghost_batch_size(model, nbs)
    for module in model.modules():
        if _is_bn(module):
            module.train()
    return model


def _grouped(loader: InMemoryLoader, nbs: int, limit: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches cut to whole groups of ``nbs`` images, ``limit`` images at most."""
    left = limit
    for x, y in loader:
        keep = len(y) if left is None else min(len(y), left)
        keep -= keep % nbs
        if keep == 0:
            break
        yield x[:keep], y[:keep]
        if left is not None:
            left -= keep


@torch.no_grad()
def _error(model: nn.Module, batches) -> tuple[float, int]:
    """Top-1 error in % and the number of images."""
    wrong = total = 0
    for x, y in batches:
        wrong += int((model(x).argmax(-1) != y).sum())
        total += len(y)
    if total == 0:
        raise UserError("the study has no images to evaluate: the data subsets are smaller than the NBS")
    return 100.0 * wrong / total, total


def bn_study(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    nbs: Sequence[int] | None = None,
    batch_size: int = 1024,
    precise_images: int = 4096,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[dict]:
    """The study's rows, one per NBS (keys ``COLUMNS``; errors in %). The caller's model is not changed.

    Args:
        model: a trained VisionTransformer with BatchNorm.
        train: training images (mini-batch errors and precise statistics); shuffled with ``seed``.
        val: validation images.
        mean: per-channel normalization mean of the data, on the [0, 1] scale.
        std: per-channel std.
        nbs: normalization batch sizes; None: 2, 4, ..., 1024 capped at the smaller split.
        batch_size: images per forward pass (rounded down to a multiple of each NBS, at least one NBS).
        precise_images: training images for the precise statistics (at least one NBS group).
        device: where to compute.
        seed: the order of the training images.
    """
    if not any(_is_bn(m) for m in model.modules()):
        raise UserError("the model has no BatchNorm: the study compares BatchNorm statistics (use vitbn/vitbnffn)")
    for name, value in (("batch_size", batch_size), ("precise_images", precise_images)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer")
    limit = min(len(train), len(val))
    sizes = default_nbs(limit) if nbs is None else sorted(set(nbs))
    bad = [n for n in sizes if not isinstance(n, int) or n < 1 or n > limit]
    if bad or not sizes:
        raise UserError(f"NBS {bad or sizes} must be integers in [1, {limit}] (the smaller split has {limit} images)")
    model = copy.deepcopy(model).to(device).eval()
    opts = dict(mean=mean, std=std, device=device)

    def loader(split: Split, n: int, shuffle: bool) -> InMemoryLoader:
        return InMemoryLoader(split, batch_size=max(n, batch_size - batch_size % n), shuffle=shuffle, seed=seed, **opts)

    ema_error, val_images = _error(model, loader(val, 1, False))
    rows = []
    for n in sizes:
        row = {"nbs": n}
        batch_stats = _with_batch_stats(model, n)  # in training mode BN ignores its running stats: one copy serves
        row["train_batch"], row["train_images"] = _error(batch_stats, _grouped(loader(train, n, True), n))
        row["val_batch"], _ = _error(batch_stats, _grouped(loader(val, n, False), n))
        row["val_ema"], row["val_images"] = ema_error, val_images
        precise = copy.deepcopy(model)
        set_ghost_batch_size(precise, n)
        budget = min(len(train), max(precise_images, n))
        batches = list(_grouped(loader(train, n, True), n, limit=budget))
        recompute_bn_stats(precise, batches, num_batches=len(batches))
        row["val_precise"], _ = _error(precise.eval(), loader(val, 1, False))
        row["precise_images"] = sum(len(y) for _, y in batches)
        rows.append({key: row[key] for key in COLUMNS})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, errors with two decimals."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if c in KINDS else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``bn_study.md`` and ``bn_study.csv`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "bn_study.md", out_dir / "bn_study.csv"
    md.write_text("# BatchNorm statistics: error (%) vs normalization batch size\n\n" + markdown_table(rows))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path


def plot_study(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Error vs NBS (log2 axis), one line per kind of statistics; saved to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    nbs = [row["nbs"] for row in rows]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kind, label in KINDS.items():
        style = "--" if kind == "val_ema" else "-"
        ax.plot(nbs, [row[kind] for row in rows], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(nbs, [str(n) for n in nbs])
    ax.set_xlabel("normalization batch size")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title(title or "BatchNorm statistics vs normalization batch size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def log_study(tracker, rows: list[dict], files: Sequence[str | Path], params: dict, run_name: str = "bn-study") -> str:
    """Logs the study as one run of a ``vitbn.tracking.Tracker``: params, the errors as metrics
    ``bn_study/<kind>_error`` with ``step=NBS``, the files as artifacts under ``bn_study/``. Returns the run id."""
    run_id = tracker.start_run(run_name, tags={"vitbn.kind": "bn-study"})
    try:
        tracker.log_params(params)
        for row in rows:
            tracker.log_metrics({f"bn_study/{kind}_error": float(row[kind]) for kind in KINDS}, step=int(row["nbs"]))
        for path in files:
            tracker.log_artifact(path, "bn_study")
    except BaseException:
        tracker.end_run("FAILED")
        raise
    tracker.end_run("FINISHED")
    return run_id
