"""Optimizers with weight-decay groups, and the learning-rate schedule (per step)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vitbn.config import TrainConfig

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
    """Adam, AdamW or SGD over ``param_groups``; the fused kernel where the device has one, else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        cls, kwargs = torch.optim.Adam, {"betas": cfg.betas}
    elif cfg.optimizer == "adamw":
        cls, kwargs = torch.optim.AdamW, {"betas": cfg.betas}
    elif cfg.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.momentum}
    else:
        raise ValueError(f"optimizer={cfg.optimizer!r} is not one of 'adam', 'adamw', 'sgd'")
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
