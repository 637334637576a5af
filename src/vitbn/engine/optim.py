"""Optimizers with weight-decay groups, and the schedules by step: the learning rate, PRepBN's lambda."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vitbn.config import TrainConfig
from vitbn.models.norms import PRepBN, prepbn_lambda

# Parameters that are embeddings rather than weights of a linear map: decaying them pulls them to 0.
NO_DECAY_NAMES = ("cls_token", "pos_embedding")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ``decay`` (weight matrices) with ``weight_decay``, ``no_decay`` with 0 (norm scales and
    shifts, biases, ``cls_token``, ``pos_embedding``, any other 0-/1-D parameter). Empty groups are dropped."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = isinstance(module, _NORM_TYPES) or name == "bias" or name in NO_DECAY_NAMES or p.ndim <= 1
            (no_decay if exempt else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``param_groups``; the fused kernel where the device has one (not for SGD with
    momentum), else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        cls, kwargs = torch.optim.Adam, {"betas": cfg.betas}
    elif cfg.optimizer == "adamw":
        cls, kwargs = torch.optim.AdamW, {"betas": cfg.betas}
    elif cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        raise ValueError(f"optimizer={cfg.optimizer!r} is not one of 'adam', 'adamw', 'sgd'")
    if cfg.optimizer == "sgd" and cfg.momentum:
        # Fused SGD starts its momentum buffers for all parameters at the first step or for none: a parameter
        # whose first gradient comes later (PRepBN's RepBN once the ramp begins) makes it raise a TypeError.
        return cls(groups, lr=cfg.lr, foreach=True, **kwargs)
    try:
        return cls(groups, lr=cfg.lr, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return cls(groups, lr=cfg.lr, foreach=True, **kwargs)


class WarmupCosine:
    """LR factor of step ``s`` (0-based): ``(s + 1) / warmup`` during the linear warm-up, then
    ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))`` for cosine, or 1 for constant.

    A callable object rather than a closure so that ``LambdaLR.state_dict`` saves its fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int, cosine: bool = True) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR | None:
    """A per-step LambdaLR for ``cosine`` or a warm-up; None for a constant rate (the study's)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant" and warmup == 0:
        return None
    factor = WarmupCosine(warmup, cfg.epochs * steps_per_epoch, cosine=cfg.schedule == "cosine")
    return LambdaLR(optimizer, factor)


def load_scheduler(scheduler: LambdaLR, state: dict, cfg: TrainConfig, steps_per_epoch: int) -> str | None:
    """Loads a checkpoint's scheduler state, keeping this run's schedule length: a run resumed with more (or
    fewer) ``epochs`` than it was started with would otherwise keep the old total, and a cosine lr would sit at 0
    for the added epochs. The schedule is rescaled to the new total (the lr continues on the new curve from the
    current step); returns a note saying so, or None when nothing changed."""
    scheduler.load_state_dict(state)
    factor = scheduler.lr_lambdas[0]
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    if (factor.warmup_steps, factor.total_steps) == (warmup, total):
        return None
    old_warmup, old_total = factor.warmup_steps, factor.total_steps
    factor.warmup_steps, factor.total_steps = warmup, total
    note = (f"lr schedule rescaled from {old_total} to {total} total steps (warm-up {old_warmup} -> {warmup}): the "
            f"run was started with another --epochs; at step {scheduler.last_epoch} the lr factor is now "
            f"{factor(scheduler.last_epoch):.4g}")  # fmt: skip
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return note


@dataclass(frozen=True)
class PRepBNRamp:
    """PRepBN's lambda by optimizer step (``vitbn.models.norms.prepbn_lambda``): ``warmup`` LayerNorm-only steps,
    then a linear fall to 0 over ``decay`` steps; 0 from step ``end`` on."""

    warmup: int
    decay: int

    @property
    def end(self) -> int:
        return self.warmup + self.decay

    def __call__(self, step: int) -> float:
        return prepbn_lambda(step, self.warmup, self.decay)

    @classmethod
    def of_run(cls, cfg: TrainConfig, steps_per_epoch: int) -> PRepBNRamp:
        """The ramp of a run: ``prepbn_warmup_steps`` (default a tenth of the run's steps) and
        ``prepbn_decay_steps`` (default the rest, so lambda is 0 after the last step)."""
        total = cfg.epochs * steps_per_epoch
        warmup = cfg.prepbn_warmup_steps if cfg.prepbn_warmup_steps is not None else total // 10
        decay = cfg.prepbn_decay_steps if cfg.prepbn_decay_steps is not None else max(total - warmup, 0)
        return cls(warmup, decay)


class PRepBNSchedule:
    """Sets the lambda of every PRepBN of a model from the number of optimizer steps done (the engine calls
    ``set`` before the first step and after each one), so a forward pass that is not a training step never
    moves it and a resumed run continues the ramp exactly."""

    def __init__(self, modules: list[nn.Module], ramp: PRepBNRamp) -> None:
        self.modules, self.ramp, self.value = modules, ramp, None

    @classmethod
    def for_model(cls, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> PRepBNSchedule | None:
        """The schedule of a run, or None when ``model`` has no PRepBN; warns when lambda would not reach 0."""
        modules = [m for m in model.modules() if isinstance(m, PRepBN)]
        if not modules:
            return None
        ramp, total = PRepBNRamp.of_run(cfg, steps_per_epoch), cfg.epochs * steps_per_epoch
        if ramp.end > total:
            warnings.warn(
                f"PRepBN's lambda reaches 0 at step {ramp.end}, after the run's {total} steps: the trained model "
                "keeps part of its LayerNorms and cannot be folded",
                stacklevel=4,
            )
        return cls(modules, ramp)

    def set(self, steps_done: int) -> float:
        lam = self.ramp(steps_done)
        if lam != self.value:  # constant in the warm-up and after the ramp: nothing to write
            for module in self.modules:
                module.set_lambda(lam)
            self.value = lam
        return lam
