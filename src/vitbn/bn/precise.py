"""Precise BatchNorm statistics: population statistics pooled exactly over many batches.

The exponential running average of BatchNorm lags the model (early in training the old statistics of
different weights dominate it). ``recompute_bn_stats`` replaces it by the exact statistics of the inputs
every BatchNorm sees over a number of batches, with the model in training mode (each BatchNorm normalizing
with its mini-batch statistics, as when the model was trained) and its weights fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.models.norms import TokenBatchNorm


class _Moments:
    """Running sums over the rows of a (M, C) input: count, sum and sum of squares, in float64."""

    def __init__(self) -> None:
        self.count = 0.0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None

    def add(self, x2d: torch.Tensor) -> None:
        # Per batch: an accurate two-pass mean and variance, then E[x] and E[x^2] weighted by the row count.
        var, mean = torch.var_mean(x2d.detach().double(), dim=0, unbiased=False)
        n = x2d.shape[0]
        s, sq = mean * n, (var + mean * mean) * n
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += n

    def all_reduce(self) -> None:
        packed = torch.cat([self.sum.new_tensor([self.count]), self.sum, self.sum_sq])
        dist.all_reduce(packed)
        c = self.sum.numel()
        self.count, self.sum, self.sum_sq = float(packed[0]), packed[1 : 1 + c], packed[1 + c :]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance of all the rows seen."""
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(0.0)
        return mean, var * (self.count / max(self.count - 1.0, 1.0))


def _channels_last_2d(x: torch.Tensor) -> torch.Tensor:
    """A ``BatchNorm*d`` input (M, C, *) as the (rows, C) matrix it normalizes per column."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).t() if x.dim() > 2 else x


def _collectors(model: nn.Module) -> list[tuple[_BatchNorm, nn.Module, _Moments]]:
    """(BatchNorm, module to hook, moments) for every BatchNorm. A TokenBatchNorm is hooked at the wrapper,
    whose input is what its inner BN normalizes, because its ghost-BN training path bypasses the inner
    module's forward."""
    out, inner = [], set()
    for module in model.modules():
        if isinstance(module, TokenBatchNorm) and isinstance(module.bn, _BatchNorm):
            out.append((module.bn, module, _Moments()))
            inner.add(id(module.bn))
    for module in model.modules():
        if isinstance(module, _BatchNorm) and id(module) not in inner:
            out.append((module, module, _Moments()))
    return out


def _hook(bn: _BatchNorm, moments: _Moments):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if isinstance(module, TokenBatchNorm):
            moments.add(x.reshape(-1, bn.num_features))  # (B, N, D) -> (B*N, D), or (B*N*D, 1) for scalar stats
        else:
            moments.add(_channels_last_2d(x))

    return hook


def _first(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module, batches: Iterable, num_batches: int | None = None, *, all_reduce: bool = False
) -> int:
    """Sets every BatchNorm's running statistics to the exact population statistics of its input.

    For each BatchNorm the mean and the (biased) variance of every batch are pooled, weighted by the batch's
    row count (B*N tokens for a token BatchNorm), into the mean and the unbiased variance of all the rows
    together, which become ``running_mean`` and ``running_var``. During the passes the model is in training
    mode (BatchNorm normalizes with mini-batch statistics, ghost BN included) without gradients; afterwards its
    modes, momenta and ``num_batches_tracked`` are as before and its parameters untouched. Frozen BatchNorms
    keep their statistics.

    Args:
        model: the model, possibly DDP-wrapped.
        batches: an iterable of image tensors (B, C, H, W) or of ``(images, labels)`` pairs.
        num_batches: how many batches to use; None: all. If the data has fewer, a warning says how many were
            used and the statistics use those.
        all_reduce: pool the statistics over all ranks of the default process group (call it on every rank,
            with the same number of batches).

    Returns:
        The number of batches used (0 when the model has no BatchNorm).
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"num_batches={num_batches!r} must be a positive integer or None")
    collectors = _collectors(model)
    if not collectors:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [(bn, bn.momentum, bn.num_batches_tracked.clone()) for bn, _, _ in collectors]
    handles = [where.register_forward_pre_hook(_hook(bn, moments)) for bn, where, moments in collectors]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    used = 0
    try:
        model.train()
        for bn, _, _ in collectors:
            bn.momentum = 0.0  # the passes leave the running averages as they are
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            model(_first(batch).to(device))
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        for bn, momentum, tracked in momenta:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
    if used == 0:
        raise ValueError("recompute_bn_stats got no batches: the data is empty")
    if num_batches is not None and used < num_batches:
        warnings.warn(
            f"recompute_bn_stats: asked for {num_batches} batches but the data has {used}; using {used}",
            stacklevel=2,
        )
    _write_stats(collectors, all_reduce)
    return used


def _write_stats(collectors: list[tuple[_BatchNorm, nn.Module, _Moments]], all_reduce: bool) -> None:
    reduce = all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for bn, _, moments in collectors:
        if moments.sum is None:
            continue  # a BatchNorm the forward pass does not reach keeps its statistics
        if reduce:
            moments.all_reduce()
        mean, var = moments.mean_var()
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
