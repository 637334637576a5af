"""Normalization layers for token sequences, chosen by name (``make_norm``): LayerNorm, RMSNorm, token
BatchNorm, RepBN, PRepBN, DyT or none."""

from __future__ import annotations

import torch
from torch import nn

from vitbn.config import BN_STATS, NORMS

RMS_EPS = 1e-6  # timm's and the DyT paper's RMSNorm eps


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
        # Statistics and normalization in fp32 (fp64 stays fp64) whatever the autocast dtype, rounded once at the
        # end, as nn.BatchNorm does: a bf16 mean of data far from zero would shift every output by its rounding.
        compute = torch.promote_types(x2d.dtype, torch.float32)
        for chunk in chunks:
            chunk = chunk.to(compute)
            var, mean = torch.var_mean(chunk, dim=0, unbiased=False)
            out = (chunk - mean) * torch.rsqrt(var + bn.eps)  # the statistics stay in the graph, as in BN
            out = out * bn.weight.to(compute) + bn.bias.to(compute) if bn.affine else out
            outs.append(out.to(x2d.dtype))
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


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al., "Transformers without Normalization", 2025): ``weight * tanh(alpha * x) + bias``,
    element-wise over the last axis; ``alpha`` is one learnable scalar, ``weight`` and ``bias`` are per feature.
    No statistics and no reductions.

    Args:
        num_features: D.
        alpha: the initial ``alpha`` (the paper's 0.5 for ViTs).
    """

    def __init__(self, num_features: int, *, alpha: float = 0.5) -> None:
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha_init={self.alpha.item():.3g}"


class RepBN(nn.Module):
    """Re-parameterizable BatchNorm (Guo et al., SLAB, 2024): ``BN(x) + eta * x`` with ``eta`` a learnable scalar
    (1 at init). ``bn`` is a ``TokenBatchNorm``, so every BatchNorm tool reaches it; in eval mode the whole map is
    affine (``(s + eta) x + t``) and folds into the next Linear like a BatchNorm.

    Args:
        num_features: D.
        **bn_options: ``stats``, ``momentum``, ``eps``, ``ghost_batch_size`` of the inner TokenBatchNorm.
    """

    def __init__(self, num_features: int, **bn_options) -> None:
        super().__init__()
        self.bn = TokenBatchNorm(num_features, **bn_options)
        self.eta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.eta * x


# PRepBN's three regimes, from lambda: LayerNorm alone (lambda = 1), the blend, RepBN alone (lambda = 0).
PREPBN_PHASES = ("layer", "blend", "repbn")


def _phase(lam: float) -> str:
    return "layer" if lam >= 1.0 else "repbn" if lam <= 0.0 else "blend"


class PRepBN(nn.Module):
    """Progressive re-parameterized BatchNorm (SLAB): ``lam * LN(x) + (1 - lam) * RepBN(x)``.

    ``lam`` (a persistent buffer, so checkpoints and saved models hold it) is set by the training engine from the
    optimizer step (``set_prepbn_lambda``, schedule ``prepbn_lambda``); the module counts nothing itself, so extra
    forward passes (evaluation, precise BN, a second SAM pass) leave it alone. At ``lam = 1`` (the warm-up) only the
    LayerNorm runs, as in SLAB's code, so BN statistics start with the ramp; at ``lam = 0`` only RepBN runs, in
    training and in eval mode, and the module folds into the next Linear. In between, eval mode blends the
    LayerNorm with RepBN on its running statistics. ``phase`` (a Python string kept in step with ``lam``) picks
    the branch without reading the tensor, so a forward pass never synchronizes with the device.

    Args:
        num_features: D.
        **bn_options: for the RepBN's TokenBatchNorm.
    """

    def __init__(self, num_features: int, **bn_options) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(num_features)
        self.repbn = RepBN(num_features, **bn_options)
        self.register_buffer("lam", torch.ones(()))
        self.phase = "layer"
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_phase())

    def _sync_phase(self) -> None:
        self.phase = _phase(float(self.lam))

    def set_lambda(self, lam: float) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"PRepBN lambda={lam!r} must be in [0, 1]")
        self.lam.fill_(lam)
        self.phase = _phase(lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase == "layer":
            return self.ln(x)
        if self.phase == "repbn":
            return self.repbn(x)
        rep = self.repbn(x)
        return rep + self.lam * (self.ln(x) - rep)  # lam * LN + (1 - lam) * RepBN, in one fewer product

    def extra_repr(self) -> str:
        return f"lam={float(self.lam):.4g} ({self.phase})"


def prepbn_lambda(step: int, warmup: int, decay: int) -> float:
    """PRepBN's lambda before optimizer step ``step`` (0-based): 1 for the ``warmup`` LayerNorm-only steps, then
    falling linearly to 0 over ``decay`` steps, 0 after (SLAB's schedule with ``r0 = 1``)."""
    if step < warmup:
        return 1.0
    if decay <= 0:
        return 0.0
    return max(0.0, 1.0 - (step - warmup) / decay)


def set_prepbn_lambda(model: nn.Module, lam: float) -> int:
    """Sets lambda in every PRepBN of ``model`` (possibly wrapped); returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, PRepBN):
            module.set_lambda(lam)
            count += 1
    return count


def prepbn_state(model: nn.Module) -> float | None:
    """The largest lambda over the PRepBNs of ``model``, or None when it has none."""
    values = [float(m.lam) for m in model.modules() if isinstance(m, PRepBN)]
    return max(values) if values else None


class ChannelsLast(nn.Module):
    """A token norm (acting on the last axis) applied to the channels of a (B, C, H, W) map, for the stems:
    each position is normalized (RMSNorm) or mapped (DyT) on its own, and a BatchNorm inside pools B x H x W,
    exactly as ``BatchNorm2d``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm_options(config) -> dict:
    """The ``make_norm`` keywords a ``ModelConfig`` implies."""
    return {"stats": config.bn_stats, "momentum": config.bn_momentum, "ghost_batch_size": config.ghost_batch_size,
            "dyt_alpha": config.dyt_alpha}  # fmt: skip


def make_norm(kind: str, dim: int, **options) -> nn.Module:
    """The norm factory, one kind per name of ``vitbn.config.NORMS``.

    ``"layer"`` LayerNorm; ``"rms"`` RMSNorm (``nn.RMSNorm``, eps 1e-6); ``"batch"`` TokenBatchNorm; ``"repbn"``
    RepBN; ``"prepbn"`` PRepBN; ``"dyt"`` DyT; ``"none"`` Identity.

    Args:
        kind: the norm name.
        dim: the feature width.
        **options: ``stats``, ``momentum``, ``ghost_batch_size`` for the BatchNorm kinds, ``dyt_alpha`` for DyT;
            each kind ignores the others.
    """
    bn_options = {k: options[k] for k in ("stats", "momentum", "eps", "ghost_batch_size") if k in options}
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=RMS_EPS)
    if kind == "batch":
        return TokenBatchNorm(dim, **bn_options)
    if kind == "repbn":
        return RepBN(dim, **bn_options)
    if kind == "prepbn":
        return PRepBN(dim, **bn_options)
    if kind == "dyt":
        return DyT(dim, alpha=options.get("dyt_alpha", 0.5))
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of {', '.join(repr(n) for n in NORMS)}")
