"""Frozen BatchNorm: a BatchNorm turned into the fixed affine map of its running statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenBatchNorm(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in every mode.

    It holds the very parameter and buffer tensors of the BatchNorm it replaces (same objects, so an optimizer
    built before freezing keeps training the affine parameters) under the same names, so state dicts of frozen
    and unfrozen models are interchangeable. Nothing is updated in training mode. The channel axis is dim 1, as
    in every ``BatchNorm*d``: (M, C) or (M, C, *).

    Args:
        bn: the BatchNorm to freeze; it needs running statistics (``track_running_stats=True``).
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {bn}: it has no running statistics (track_running_stats=False)")
        self.num_features = bn.num_features
        self.eps = bn.eps
        # Kept to rebuild the same BatchNorm in ``to_batchnorm``.
        self.momentum = bn.momentum
        self.bn_class = type(bn)
        self.has_process_group = hasattr(bn, "process_group")  # a SyncBatchNorm
        self.process_group = getattr(bn, "process_group", None)
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The map as ``y = x * scale + shift``, both (C,)."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over dim 1
        return x * scale.reshape(shape) + shift.reshape(shape)

    def to_batchnorm(self) -> _BatchNorm:
        """A BatchNorm of the original class holding this module's tensors (the inverse of the constructor)."""
        kwargs = {"eps": self.eps, "momentum": self.momentum, "affine": self.weight is not None}
        if self.has_process_group:
            kwargs["process_group"] = self.process_group
        bn = self.bn_class(self.num_features, **kwargs)
        bn.weight, bn.bias = self.weight, self.bias
        bn.running_mean, bn.running_var = self.running_mean, self.running_var
        bn.num_batches_tracked = self.num_batches_tracked
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _replace_children(module: nn.Module, convert) -> int:
    """Replaces every descendant ``c`` for which ``convert(c)`` is not None; returns how many."""
    count = 0
    for name, child in module.named_children():
        new = convert(child)
        if new is not None:
            setattr(module, name, new)
            count += 1
        else:
            count += _replace_children(child, convert)
    return count


def freeze_bn(model: nn.Module) -> nn.Module:
    """Turns every BatchNorm of ``model`` into a ``FrozenBatchNorm``, in place.

    The frozen layers normalize with their running statistics in training mode too and never update them;
    their affine parameters stay trainable. Returns ``model``.
    """
    if isinstance(model, _BatchNorm):
        raise ValueError("freeze_bn works on a model holding BatchNorm layers, not on a bare BatchNorm")
    _replace_children(model, lambda m: FrozenBatchNorm(m).train(m.training) if isinstance(m, _BatchNorm) else None)
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Turns every ``FrozenBatchNorm`` back into the BatchNorm it came from, same tensors, in place; returns
    ``model``."""
    _replace_children(model, lambda m: m.to_batchnorm() if isinstance(m, FrozenBatchNorm) else None)
    return model


@contextmanager
def kept_bn_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BatchNorm's running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) as they were on entry; training-mode passes still normalize with batch statistics.

    For extra passes that are not a step of the running average: SAM's perturbed pass, Hessian-vector products
    and loss-landscape points in training-mode BN. The buffers are copied on entry and written back in place on
    exit (same tensor objects, so a compiled graph or a DDP wrapper holding them sees the restored values).
    """
    saved = [
        (buf, buf.detach().clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm)
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
