"""``analyze``: every analysis of a trained model on fixed images, written to a folder as ``analysis.json``,
figures and the attention arrays (what ``vitbn analyze`` runs).

The Hessian, the active fractions and the landscape use the first ``images`` training images (fixed and in
order, so a rerun sees the same loss); the attention maps use the first ``attention_images`` test images.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitbn.analysis import figures
from vitbn.analysis.activity import active_fraction, weight_norms
from vitbn.analysis.attention import attention_maps, patch_attention, rollout
from vitbn.analysis.common import BN_MODES, Batches, parameter_blocks
from vitbn.analysis.hessian import Eigen, lambda_max
from vitbn.analysis.landscape import loss_slice

RESULT_NAME = "analysis.json"
FILES = {
    "attention": "attention.png",
    "heads": "attention_heads.png",
    "arrays": "attention.npz",
    "landscape": "landscape.png",
    "blocks": "blocks.png",
}


@dataclass
class AnalyzeOptions:
    """What ``analyze`` computes and how hard it tries."""

    images: int = 2048  # the first N training images: the loss of the Hessian, activity and landscape
    batch_size: int = 256  # images per forward pass (with bn_mode "train": the batch of the BN statistics)
    bn_mode: str = "eval"  # "eval": running BN statistics; "train": batch statistics (running ones kept)
    tol: float = 1e-3  # relative tolerance of power iteration on successive estimates
    max_iter: int = 100  # Hessian-vector products per power iteration (whole model)
    block_max_iter: int | None = None  # the same for each parameter block; None: max_iter
    blocks: bool = True  # lambda_max per parameter block too
    attention_images: int = 4  # test images of the attention figures
    landscape_points: int = 21  # alphas on [-1, 1]
    seed: int = 0  # start vectors of power iteration, direction of the landscape

    def __post_init__(self) -> None:
        for name in ("images", "batch_size", "max_iter", "attention_images"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.block_max_iter is not None and not (isinstance(self.block_max_iter, int) and self.block_max_iter >= 1):
            raise ValueError(f"block_max_iter={self.block_max_iter!r} must be an integer >= 1 or None")
        if not (isinstance(self.landscape_points, int) and self.landscape_points >= 2):
            raise ValueError(f"landscape_points={self.landscape_points!r} must be an integer >= 2")
        if not (isinstance(self.tol, float | int) and 0 < self.tol < 1):
            raise ValueError(f"tol={self.tol!r} must be in (0, 1)")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode={self.bn_mode!r} is not one of {', '.join(repr(m) for m in BN_MODES)}")


# ``--quick``: a smoke run in seconds (tests, a first look).
QUICK = dict(images=256, max_iter=20, block_max_iter=5, attention_images=2, landscape_points=7)


class Progress:
    """A tqdm bar per power iteration (on a terminal) and a line per finished part on stderr; silent when off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def iteration(self, desc: str, total: int) -> Callable[[int, float], None] | None:
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=desc, unit="hvp", leave=False, disable=None, file=sys.stderr)

        def update(it: int, value: float) -> None:
            self._bar.total = max(self._bar.total, it)  # a shifted second run may follow the first
            self._bar.update(it - self._bar.n)
            self._bar.set_postfix_str(f"{value:.5g}", refresh=False)

        return update

    def line(self, text: str) -> None:
        self.close()
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def train_batches(split, options: AnalyzeOptions, mean, std, device: torch.device) -> Batches:
    """The first ``options.images`` images of ``split`` as normalized batches on ``device`` (as the training
    loader normalizes them, without shuffling)."""
    from vitbn.data import InMemoryLoader

    loader = InMemoryLoader(
        split.head(options.images), batch_size=options.batch_size, mean=mean, std=std, device=device
    )
    return list(loader)


def _eigen(e: Eigen, **extra: Any) -> dict[str, Any]:
    """An estimate as JSON: ``lambda_max``, ``residual``, ``iterations``, ``converged``, ``shifted``, extras."""
    found = e.to_dict()
    return {"lambda_max": found.pop("value"), **found, **extra}


def hessian_part(model: nn.Module, batches: Batches, options: AnalyzeOptions, progress: Progress, seconds: dict):
    """lambda_max of the whole model and, with ``options.blocks``, of each parameter block."""
    started = time.perf_counter()
    common = dict(bn_mode=options.bn_mode, tol=options.tol, seed=options.seed)
    whole = lambda_max(model, batches, max_iter=options.max_iter, name="all parameters",
                       callback=progress.iteration("lambda_max (all)", options.max_iter), **common)  # fmt: skip
    seconds["hessian"] = time.perf_counter() - started
    progress.line(f"hessian   lambda_max {whole.value:.5g} ({whole.iterations} iterations, {seconds['hessian']:.1f} s)")
    result = {**_eigen(whole), "tol": options.tol, "max_iter": options.max_iter, "blocks": {}}
    if not options.blocks:
        return result
    started, cap = time.perf_counter(), options.block_max_iter or options.max_iter
    result["block_max_iter"] = cap
    for name, params in parameter_blocks(model).items():
        if not params:
            continue  # nothing trainable to differentiate
        tick = time.perf_counter()
        e = lambda_max(
            model, batches, params, max_iter=cap, callback=progress.iteration(name, cap), name=name, **common
        )
        took = time.perf_counter() - tick
        result["blocks"][name] = _eigen(e, params=sum(p.numel() for p in params), seconds=round(took, 3))
    seconds["blocks"] = time.perf_counter() - started
    progress.line(f"blocks    {len(result['blocks'])} parameter blocks ({seconds['blocks']:.1f} s)")
    return result


def attention_part(model: nn.Module, test, count: int, mean, std, device) -> dict[str, Any]:
    """The attention of the first ``count`` test images: raw maps, the pooled token's maps over the patch grid
    per layer (head mean) and per head, the rollout; all numpy arrays."""
    from vitbn.data import InMemoryLoader

    split = test.head(count)
    loader = InMemoryLoader(split, batch_size=len(split), mean=mean, std=std, device=device)
    logits, maps = attention_maps(model, loader.normalize(loader.images))  # maps: (B, L, H, N, N)
    c = model.config
    grid, cls = model.to_patch_embedding.grid, c.pool == "cls"
    b, layers, heads, n, _ = maps.shape

    def pooled(flow: torch.Tensor) -> torch.Tensor:  # (M, N, N) -> (M, gh, gw)
        if not cls and c.has_class_token:  # mean pooling over a sequence with a CLS token: its column dropped
            flow = flow[:, :, 1:]
        return patch_attention(flow, grid, cls)

    return {
        "maps": maps.cpu().numpy(),
        "layer_maps": pooled(maps.mean(dim=2).reshape(b * layers, n, n)).reshape(b, layers, *grid).cpu().numpy(),
        "head_maps": pooled(maps.reshape(b * layers * heads, n, n)).reshape(b, layers, heads, *grid).cpu().numpy(),
        "rollout": pooled(rollout(maps)).cpu().numpy(),
        "logits": logits.float().cpu().numpy(),
        "indices": np.arange(len(split)),
        "labels": split.labels.numpy(),
        "images": split.images.numpy(),
        "class_token": cls,
    }


def analyze(
    model: nn.Module,
    data,
    out_dir: str | Path,
    options: AnalyzeOptions | None = None,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    checkpoint: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Runs every analysis of ``model`` on ``data`` and writes ``analysis.json``, the figures and
    ``attention.npz`` into ``out_dir``.

    Args:
        model: a VisionTransformer (its weights, mode and BN statistics are left as they were).
        data: a ``vitbn.data.PreparedData``.
        out_dir: the output folder (created).
        options: what to compute (default ``AnalyzeOptions()``).
        mean: per-channel normalization of the images (default: the dataset's), as the model was trained.
        std: the same.
        checkpoint: recorded in the result.
        progress: progress bars and a line per part on stderr.

    Returns:
        The JSON-able result, as written to ``analysis.json``.
    """
    from vitbn.engine.setup import check_data_fits_model
    from vitbn.models import count_params

    options = options or AnalyzeOptions()
    check_data_fits_model(model.config, data.info)
    mean, std = mean or data.info.mean, std or data.info.std
    device = next(model.parameters()).device
    report, seconds, started = Progress(progress), {}, time.perf_counter()
    try:
        batches = train_batches(data.train, options, mean, std, device)
        result = {
            "checkpoint": checkpoint, "model": {"name": model.config.name, "params": count_params(model)},
            "dataset": data.info.name, "images": sum(len(y) for _, y in batches), "bn_mode": options.bn_mode,
            "options": asdict(options), "device": str(device), "threads": torch.get_num_threads(),
        }  # fmt: skip
        result["hessian"] = hessian_part(model, batches, options, report, seconds)
        result.update(_activity_part(model, batches, seconds))
        result["landscape"] = _landscape_part(model, batches, options, seconds)
        report.line(f"landscape {options.landscape_points} points ({seconds['landscape']:.1f} s)")
        tick = time.perf_counter()
        attention = attention_part(model, data.test, options.attention_images, mean, std, device)
        seconds["attention"] = time.perf_counter() - tick
        tick = time.perf_counter()
        result["files"] = write_outputs(Path(out_dir), result, attention, data.info.classes)
        seconds["figures"] = time.perf_counter() - tick
    finally:
        report.close()
    result["attention"] = {"images": attention["indices"].tolist(), "class_token": attention["class_token"],
                           "pooled": figures.pooled_name(attention["class_token"]),
                           "files": [FILES["attention"], FILES["heads"], FILES["arrays"]]}  # fmt: skip
    seconds["total"] = time.perf_counter() - started
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_json(result, Path(out_dir) / RESULT_NAME)
    return result


def _activity_part(model: nn.Module, batches: Batches, seconds: dict) -> dict[str, Any]:
    started = time.perf_counter()
    active = active_fraction(model, batches)
    active["mean"] = sum(active.values()) / len(active)
    seconds["activity"] = time.perf_counter() - started
    return {"active_fraction": active, "weight_norms": weight_norms(model)}


def _landscape_part(model: nn.Module, batches: Batches, options: AnalyzeOptions, seconds: dict) -> dict[str, Any]:
    started = time.perf_counter()
    points = options.landscape_points
    found = loss_slice(model, batches, points=points, seed=options.seed, bn_mode=options.bn_mode)
    seconds["landscape"] = time.perf_counter() - started
    return {**found.to_dict(), "seed": options.seed, "direction": "filter-normalized Gaussian, biases and norms 0"}


def write_outputs(out: Path, result: dict, attention: dict, classes: list[str]) -> list[str]:
    """The figures and ``attention.npz`` (each written whole, under a temporary name first); their names."""
    out.mkdir(parents=True, exist_ok=True)
    cls = attention["class_token"]
    predicted = attention["logits"].argmax(axis=1)
    labels = [f"test #{i}: {classes[y]} (pred. {classes[p]})"
              for i, y, p in zip(attention["indices"], attention["labels"], predicted)]  # fmt: skip
    images = attention["images"]
    figures.save_png(
        figures.attention_grid(images, attention["layer_maps"], attention["rollout"], class_token=cls, labels=labels),
        out / FILES["attention"],
    )
    figures.save_png(figures.head_grid(images[0], attention["head_maps"][0], class_token=cls), out / FILES["heads"])
    arrays = {k: v for k, v in attention.items() if isinstance(v, np.ndarray)}
    _atomic_bytes(out / FILES["arrays"], _npz_bytes(arrays))
    title = (
        f"{result['model']['name']} on {result['images']} {result['dataset']} training images, BN {result['bn_mode']}"
    )
    scape = result["landscape"]
    figures.save_png(
        figures.landscape_plot(scape["alphas"], scape["loss"], scape["acc"], title), out / FILES["landscape"]
    )
    lambdas = {name: e["lambda_max"] for name, e in result["hessian"]["blocks"].items()}
    active = {k: v for k, v in result["active_fraction"].items() if k != "mean"}
    figures.save_png(figures.block_bars(lambdas, active, title), out / FILES["blocks"])
    return [RESULT_NAME, *FILES.values()]


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(result: dict, path: Path) -> None:
    """``result`` as indented JSON, written whole (temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(path, (json.dumps(result, indent=2) + "\n").encode())


def analysis_data(model: nn.Module, dataset: str, options: AnalyzeOptions, root: str | None = None):
    """The images ``analyze`` needs of ``dataset`` (the first ``options.images`` training images and
    ``options.attention_images`` test images), checked against the model's input."""
    from vitbn.config import DataConfig
    from vitbn.data import prepare_data
    from vitbn.engine.setup import check_data_fits_model
    from vitbn.errors import UserError

    data = prepare_data(DataConfig(dataset=dataset, root=root, train_subset=options.images,
                                   test_subset=options.attention_images))  # fmt: skip
    check_data_fits_model(model.config, data.info)
    if len(data.train) == 0 or len(data.test) == 0:
        raise UserError(f"dataset {dataset!r} has no training or no test images")
    return data


def analyze_checkpoint(
    checkpoint: str | Path,
    options: AnalyzeOptions,
    *,
    out: str | Path | None = None,
    dataset: str | None = None,
    data_root: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Any], Path, Path]:
    """``analyze`` of a model file or run folder written by ``vitbn train``, on its training dataset (or
    ``dataset``), into ``out`` (default: ``analysis/`` beside the model): ``(result, out, model_path)``."""
    from vitbn.engine.checkpoint import load_inference, resolve_model_path

    model_path = resolve_model_path(checkpoint)
    model, spec = load_inference(model_path, map_location=device)
    data = analysis_data(model, dataset or spec.dataset, options, data_root)
    out = Path(out) if out else model_path.parent / "analysis"
    result = analyze(model, data, out, options, mean=spec.mean, std=spec.std, checkpoint=str(model_path),
                     progress=progress)  # fmt: skip
    return result, out, model_path
