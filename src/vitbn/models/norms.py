"""Normalization layers for token sequences, chosen by name: ``"layer" | "batch" | "none"``."""

from __future__ import annotations

import torch
from torch import nn

from vitbn.config import BN_STATS, NORMS


class TokenBatchNorm(nn.Module):
    """BatchNorm over the features of a token sequence, statistics pooled over batch x tokens.

    A bare ``BatchNorm1d`` on a (B, N, D) tensor would normalize over the token axis N; here the tokens are
    flattened to (B*N, D) and normalized per feature, CLS token included. The work is done by an inner
    ``nn.BatchNorm1d`` (``self.bn``), so every standard tool for BatchNorm (SyncBatchNorm conversion, precise
    statistics, freezing, folding) applies to it unchanged.

    Args:
        num_features: D, the token width.
        stats: ``"feature"`` (one mean and variance per feature) or ``"scalar"`` (one mean and variance over
            all features, with a scalar affine: the original study's ``BatchNorm2d(1)`` formulation).
        momentum: running-average momentum, as in PyTorch.
        eps: added to the variance.
        ghost_batch_size: in training, statistics over sub-batches of this many samples (ghost BN); the
            running statistics move by the mean of the sub-batch statistics.
    """

    def __init__(
        self,
        num_features: int,
        *,
        stats: str = "feature",
        momentum: float = 0.1,
        eps: float = 1e-5,
        ghost_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if stats not in BN_STATS:
            raise ValueError(f"stats={stats!r} is not one of {', '.join(repr(s) for s in BN_STATS)}")
        if ghost_batch_size is not None and ghost_batch_size <= 0:
            raise ValueError(f"ghost_batch_size={ghost_batch_size!r} must be a positive integer")
        self.num_features = num_features
        self.stats = stats
        self.ghost_batch_size = ghost_batch_size
        self.bn = nn.BatchNorm1d(1 if stats == "scalar" else num_features, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        width = 1 if self.stats == "scalar" else shape[-1]
        x2d = x.reshape(-1, width)  # (B, N, D) -> (B*N, D), or (B*N*D, 1) for scalar stats
        ghost = self.ghost_batch_size
        if self.training and ghost is not None and ghost < shape[0] and isinstance(self.bn, nn.BatchNorm1d):
            return self._ghost_forward(x2d, rows_per_sample=x2d.shape[0] // shape[0]).reshape(shape)
        return self.bn(x2d).reshape(shape)

    def _ghost_forward(self, x2d: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
        bn = self.bn
        chunks = x2d.split(self.ghost_batch_size * rows_per_sample)
        outs, means, variances = [], [], []
        for chunk in chunks:
            var, mean = torch.var_mean(chunk, dim=0, unbiased=False)
            out = (chunk - mean) * torch.rsqrt(var + bn.eps)  # the statistics stay in the graph, as in BN
            outs.append(out * bn.weight + bn.bias if bn.affine else out)
            n = chunk.shape[0]
            means.append(mean)
            variances.append(var * n / max(n - 1, 1))  # running_var holds the unbiased estimate
        if bn.track_running_stats and bn.running_mean is not None:
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
            with torch.no_grad():
                bn.running_mean.lerp_(torch.stack(means).mean(0).to(bn.running_mean.dtype), momentum)
                bn.running_var.lerp_(torch.stack(variances).mean(0).to(bn.running_var.dtype), momentum)
                bn.num_batches_tracked.add_(1)
        return torch.cat(outs)

    def extra_repr(self) -> str:
        extra = f", ghost_batch_size={self.ghost_batch_size}" if self.ghost_batch_size else ""
        return f"{self.num_features}, stats={self.stats!r}{extra}"


def make_norm(kind: str, dim: int, **bn_options) -> nn.Module:
    """The norm factory: ``"layer"`` -> LayerNorm, ``"batch"`` -> TokenBatchNorm, ``"none"`` -> Identity.

    Args:
        kind: the norm name.
        dim: the feature width.
        **bn_options: ``stats``, ``momentum``, ``ghost_batch_size`` for TokenBatchNorm (ignored otherwise).
    """
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return TokenBatchNorm(dim, **bn_options)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of {', '.join(repr(n) for n in NORMS)}")
