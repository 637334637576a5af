"""Transfer learning: a trained model fine-tuned on another dataset, all of it or one part (Touvron et al. 2022,
"Three things everyone should know about ViTs": fine-tuning the attention only; Steiner et al. 2021).

``finetune`` loads the base model file, adapts it to the new data (``vitbn.engine.adapt``: head, position table,
channels, image size), chooses what trains (``select_trainable``), re-estimates BatchNorm statistics on the new
data, measures the cost of one training step (``step_peak_memory``, ``step_time_ms``), trains with ``fit`` and
writes ``delta.pt`` (``vitbn.engine.delta``) beside the run's ``model.pt``.

What each part trains (``PARTS``); the head is always trained, since a new head must be:

- ``all``: every parameter.
- ``attn``: the query/key/value and output projections of every attention sub-block (weights and biases), as
  DeiT's ``--attn-only`` (timm names containing ``.attn.``: its pre-norm ``norm1`` sits outside them); not the
  attention's pre-norm (here inside ``Attention``) nor its LayerScale.
- ``ffn``: ``fc1``, ``fc2`` and the norm between them (``ffn_inner_norm``) of every feed-forward sub-block;
  not its pre-norm nor its LayerScale.
- ``head``: ``mlp_head`` alone, a linear probe; the final norm stays with the frozen features.
- ``norm``: the affine parameters of every norm (patch embedding and stem, pre-norms, inner and final norms; the
  scalars of DyT, RepBN and PRepBN too).

The patch embedding, the CLS token and the position table are frozen for every part but ``all``, except that a
learned position table resampled to a new patch grid is trained too (Touvron et al.'s rule for a change of
resolution; DeiT's code trains it always). Freezing a BatchNorm's affine parameters does not freeze its running
statistics: in training mode it still normalizes with batch statistics and updates them, as in DeiT.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from vitbn.config import RunConfig, TrainConfig
from vitbn.engine.adapt import adapt_model, resize_data
from vitbn.engine.checkpoint import InputSpec, _build_saved, _read_model_file, resolve_model_path, unwrap
from vitbn.engine.delta import DELTA_NAME, save_delta, tensor_bytes
from vitbn.engine.loop import FitResult, fit
from vitbn.engine.timing import Stopwatch
from vitbn.errors import UserError
from vitbn.models.norms import DyT, PRepBN, RepBN, TokenBatchNorm, prepbn_state

__all__ = ["PARTS", "FinetuneResult", "FinetuneSetup", "finetune", "prepare_finetune", "select_trainable",
           "step_peak_memory", "step_time_ms", "trainable_parameters"]  # fmt: skip

PARTS = ("all", "attn", "ffn", "head", "norm")
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _NormBase, TokenBatchNorm, DyT, RepBN, PRepBN)
MIB = 2**20


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise UserError(f"part={part!r} is not one of {', '.join(repr(p) for p in PARTS)}")


def trainable_parameters(model: nn.Module, part: str, *, pos_embedding: bool = False) -> dict[str, nn.Parameter]:
    """The parameters ``part`` trains (see the module docstring), by name, in the model's order.

    Args:
        model: a VisionTransformer (possibly wrapped).
        part: one of ``PARTS``.
        pos_embedding: also the learned position table (set by ``finetune`` when it was resampled).
    """
    _check_part(part)
    model = unwrap(model)
    if part == "all":
        return dict(model.named_parameters())
    modules: list[nn.Module] = [model.mlp_head]
    for block in model.transformer.layers:
        if part == "attn":
            modules += [block.attn.to_qkv, block.attn.to_out]
        elif part == "ffn":
            inner = block.ff.inner_norm if hasattr(block.ff, "inner_norm") else block.ff.inner_norms
            modules += [block.ff.fc1, block.ff.fc2, inner]
    if part == "norm":
        modules += [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    chosen = {id(p) for m in modules for p in m.parameters()}
    if pos_embedding and isinstance(model.pos_embedding, nn.Parameter):
        chosen.add(id(model.pos_embedding))
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def select_trainable(model: nn.Module, part: str, *, pos_embedding: bool = False) -> int:
    """Sets ``requires_grad`` on the parameters ``part`` trains (``trainable_parameters``) and clears it on the
    others, so that the optimizer (``build_optimizer``) holds only those; returns their number of elements."""
    chosen = trainable_parameters(model, part, pos_embedding=pos_embedding)
    for name, p in unwrap(model).named_parameters():
        p.requires_grad_(name in chosen)
    return sum(p.numel() for p in chosen.values())


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer, train: TrainConfig, amp) -> None:
    from vitbn.engine.sam import SAM
    from vitbn.engine.step import make_loss, train_step

    sam = SAM(optimizer, rho=train.sam_rho, adaptive=train.sam_adaptive) if train.sam_rho else None
    params = [p for p in model.parameters() if p.requires_grad]
    train_step(model, x, y, optimizer, make_loss(train.label_smoothing), amp=amp, grad_clip=train.grad_clip,
               clip_params=params, sam=sam)  # fmt: skip


def step_peak_memory(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: TrainConfig, device: torch.device
) -> tuple[float | None, str]:
    """Peak memory of one training step of ``model`` on the batch ``(x, y)``, in MiB, and how it was measured.

    The step is the engine's (``train_step``, the run's optimizer, precision, clipping and SAM) on a copy of the
    model, with a new optimizer, so that its state (Adam's two moments of every trainable parameter) is allocated
    inside the step as at a run's first step. The peak above the memory in use before the step is measured by
    ``vitbn.bench.cases.peak_memory``: CUDA ``max_memory_allocated``; on the CPU the tensor allocations and frees
    that ``torch.profiler`` records (process RSS would not do: freed memory stays with the C allocator). The
    model's parameters and buffers and the batch, resident throughout, are added.

    Returns:
        (MiB or None when the profiler gives no memory events, the method's name).
    """
    from vitbn.bench.cases import peak_memory
    from vitbn.engine.device import make_amp
    from vitbn.engine.optim import build_optimizer

    net = copy.deepcopy(unwrap(model)).to(device).train()
    x, y = x.to(device), y.to(device)
    amp = make_amp(train.precision, device)

    def run() -> None:
        _step(net, x, y, build_optimizer(net, train), train, amp)
        net.zero_grad(set_to_none=True)  # the gradients are freed inside the window, as the optimizer state is

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peak, method = peak_memory(run, device)
    if peak is None:
        return None, method
    resident = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers(), x, y])
    return peak + resident / MIB, f"{method} + parameters, buffers and batch"


def step_time_ms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: TrainConfig, device: torch.device, *, steps: int = 5
) -> float:
    """Median wall-clock time of ``steps`` training steps of a copy of ``model`` on ``(x, y)``, in milliseconds,
    after two warm-up steps; each step is timed with device synchronization (``Stopwatch``)."""
    from vitbn.engine.device import make_amp
    from vitbn.engine.optim import build_optimizer

    net = copy.deepcopy(unwrap(model)).to(device).train()
    x, y = x.to(device), y.to(device)
    amp, optimizer = make_amp(train.precision, device), build_optimizer(net, train)
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(2 + steps):
            with Stopwatch(device) as watch:
                _step(net, x, y, optimizer, train, amp)
            if i >= 2:
                times.append(watch.seconds)
    return 1000.0 * statistics.median(times)


@dataclass
class FinetuneSetup:
    """What ``prepare_finetune`` makes: the run's config, the adapted model (trainable part selected, BatchNorm
    statistics re-estimated) and data, the notes on what was adapted, and the params and metrics to log."""

    config: RunConfig
    model: nn.Module
    data: object  # vitbn.data.PreparedData
    base_path: Path
    notes: list[str]
    params: dict
    metrics: dict


@dataclass
class FinetuneResult(FitResult):
    """``fit``'s result, with the fine-tuning's measurements also in ``final`` (``finetune/...``)."""

    part: str
    notes: list[str]
    params: dict
    delta_path: Path | None


def _read_base(base_path: str | Path) -> tuple[Path, nn.Module, InputSpec | None]:
    path = resolve_model_path(base_path)
    saved = _read_model_file(path, "cpu")
    spec = InputSpec.from_dict(saved["data"]) if isinstance(saved.get("data"), dict) else None
    return path, _build_saved(path, saved, "cpu"), spec


def _adapt(base: nn.Module, spec: InputSpec | None, data) -> tuple[nn.Module, list[str]]:
    """The base adapted to ``data``: a new head when the classes differ in number or, per the base's input
    spec, in name (MNIST's head fits scikit-learn's digits, not KMNIST's characters)."""
    c, h, w = data.info.shape
    classes = list(data.info.classes)
    new_head = len(classes) != base.config.num_classes or (spec is not None and list(spec.classes) != classes)
    return adapt_model(base, num_classes=len(classes), image_size=h if h == w else (h, w), channels=c,
                       new_head=new_head)  # fmt: skip


def _run_config(config: RunConfig, model: nn.Module, part: str) -> RunConfig:
    """The run's config: a default run name ``<model>-ft-<part>-<time>``; a PRepBN base that ended on RepBN
    (lambda 0) keeps it (no LayerNorm warm-up again) unless the ramp is set."""
    from vitbn.engine.setup import default_run_name

    track, train = config.track, config.train
    if not track.run_name:
        track = dataclasses.replace(track, run_name=default_run_name(f"{model.config.name}-ft-{part}"))
    unset = train.prepbn_warmup_steps is None and train.prepbn_decay_steps is None
    if prepbn_state(model) == 0.0 and unset:
        train = dataclasses.replace(train, prepbn_warmup_steps=0, prepbn_decay_steps=0)
    return dataclasses.replace(config, track=track, train=train)


def _precise_bn(model: nn.Module, data, train: TrainConfig, device: torch.device) -> int:
    """Re-estimates the BatchNorm statistics of ``model`` on ``precise_bn_batches`` training batches (the
    loader the engine uses for precise BN); returns the batches used, 0 for a model without BatchNorm."""
    from vitbn.bn import recompute_bn_stats
    from vitbn.data import InMemoryLoader

    if not model.config.uses_batchnorm:
        return 0
    loader = InMemoryLoader(data.train, batch_size=train.batch_size, shuffle=True, seed=train.seed + 1,
                            max_batches=train.precise_bn_batches, mean=data.info.mean, std=data.info.std,
                            device=device)  # fmt: skip
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return recompute_bn_stats(model.to(device), loader, min(train.precise_bn_batches, len(loader)))


def prepare_finetune(
    base_path: str | Path, config: RunConfig, *, part: str, image_size: int | None = None, precise_bn: bool = True
) -> FinetuneSetup:
    """Everything ``finetune`` does before training (see ``finetune`` for the arguments)."""
    from vitbn.data import InMemoryLoader, prepare_data
    from vitbn.engine.device import resolve_device
    from vitbn.models import count_params

    _check_part(part)
    path, base, spec = _read_base(base_path)
    data = prepare_data(config.data)
    if image_size is not None:
        data = resize_data(data, image_size)
    model, notes = _adapt(base, spec, data)
    device, tc = resolve_device(config.train.device), config.train
    bn_batches = _precise_bn(model, data, tc, device) if precise_bn else 0
    if bn_batches:
        notes.append(f"BatchNorm statistics re-estimated on {bn_batches} batch(es) of {data.info.name}")
    resampled = model.config.pos_emb == "learn" and base.to_patch_embedding.grid != model.to_patch_embedding.grid
    trainable = select_trainable(model, part, pos_embedding=resampled)
    x, y = next(iter(InMemoryLoader(data.train, batch_size=tc.batch_size, mean=data.info.mean, std=data.info.std,
                                    device=device)))  # fmt: skip
    memory, method = step_peak_memory(model, x, y, tc, device)
    metrics = {
        "finetune/trainable_params": trainable,
        "finetune/total_params": count_params(model),
        "finetune/step_time_ms": step_time_ms(model, x, y, tc, device),
        "finetune/full_mb": tensor_bytes(model.state_dict()) / MIB,
    }
    if memory is not None:
        metrics["finetune/peak_step_memory_mb"] = memory
    params = {"finetune.part": part, "finetune.base": str(path), "finetune.memory_method": method,
              "finetune.image_size": image_size, "finetune.precise_bn": precise_bn,
              "finetune.notes": "; ".join(notes) or "none"}  # fmt: skip
    return FinetuneSetup(_run_config(config, model, part), model, data, path, notes, params, metrics)


class _LogOnStart:
    """A tracker that logs some params and metrics (step 0) into a run as soon as it starts."""

    def __init__(self, tracker, params: dict, metrics: dict) -> None:
        self.tracker, self.params, self.metrics = tracker, params, metrics

    def start_run(self, *args, **kwargs) -> str:
        run_id = self.tracker.start_run(*args, **kwargs)
        self.tracker.log_params(self.params)
        self.tracker.log_metrics(self.metrics, step=0)
        return run_id

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


def finetune(
    base_path: str | Path,
    config: RunConfig,
    *,
    part: str,
    image_size: int | None = None,
    precise_bn: bool = True,
    tracker=None,
    parent_run_id: str | None = None,
    progress: str | None = "auto",
) -> FinetuneResult:
    """Fine-tunes the model file ``base_path`` on ``config.data`` with ``config.train``.

    The base (``load_model``'s file, or a run folder) is adapted to the dataset (``adapt_model``: classes from the
    dataset, image size and channels from its images), ``part`` is made trainable (``select_trainable``), the
    BatchNorm statistics of a BN model are re-estimated on the new training images before the first step, and
    the cost of a training step is measured; ``fit`` then trains it (``config.model`` is not used) and
    ``delta.pt`` (``save_delta``) is written beside the run's ``model.pt``. Params ``finetune.*`` and metrics
    ``finetune/...`` (trainable and total parameters, peak step memory, step time, delta and full size in MiB)
    go to the run.

    Args:
        base_path: the trained model file.
        config: the run (data, training, tracking); without a run name, ``<model>-ft-<part>-<time>``.
        part: what trains, one of ``PARTS``.
        image_size: resize the images to this side once before training (bilinear, antialiased: ``resize_data``);
            None keeps the dataset's size.
        precise_bn: re-estimate BatchNorm statistics before the first epoch (``recompute_bn_stats``).
        tracker: as for ``fit``; None: ``make_tracker(config.track)``.
        parent_run_id: as for ``fit`` (a child of an experiment).
        progress: as for ``fit``.

    Returns:
        A FinetuneResult; ``delta_path`` is None for a run that did not finish.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("finetune runs in one process: torchrun (WORLD_SIZE > 1) is not supported")
    if tracker is None:
        from vitbn.tracking import make_tracker

        tracker = make_tracker(config.track)  # an unreachable server fails here, before the work
    setup = prepare_finetune(base_path, config, part=part, image_size=image_size, precise_bn=precise_bn)
    result = fit(setup.config, tracker=_LogOnStart(tracker, setup.params, setup.metrics), model=setup.model,
                 data=setup.data, parent_run_id=parent_run_id, progress=progress)  # fmt: skip
    final, delta_path = {**result.final, **setup.metrics}, None
    if result.status == "finished":
        delta_path = result.out_dir / DELTA_NAME
        delta_mb = tensor_bytes(save_delta(result.model, setup.base_path, delta_path, setup.data)) / MIB
        final["finetune/delta_mb"] = delta_mb
        tracker.start_run(result.out_dir.name, run_id=result.run_id)  # reopened for what training made
        try:
            tracker.log_metrics({"finetune/delta_mb": delta_mb}, step=len(result.history))
            tracker.log_artifact(delta_path, "model")
        finally:
            tracker.end_run("FINISHED")
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(FitResult)}
    return FinetuneResult(**{**fields, "final": final}, part=part, notes=setup.notes, params=setup.params,
                          delta_path=delta_path)  # fmt: skip
