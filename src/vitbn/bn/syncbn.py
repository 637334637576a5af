"""SyncBatchNorm that also runs on the CPU (gloo).

PyTorch's ``nn.SyncBatchNorm`` only synchronizes CUDA/XPU tensors (its statistics kernels do not exist for
the CPU, and DDP refuses it on CPU modules). ``AllReduceSyncBatchNorm`` computes the global statistics with
two differentiable all-reduces (sum and count, then the sum of squared deviations) on any device, so that N
ranks with B/N rows each normalize, update running statistics and back-propagate exactly as one process with
the B rows. On CUDA, ``wrap_ddp`` uses PyTorch's fused ``nn.SyncBatchNorm`` instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose gradient is the all-reduced gradient (every rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class AllReduceSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the rows of all ranks together (any device).

    Outside a process group of several ranks, and in eval mode, it is a plain BatchNorm. Input (M, C, *).

    Args:
        num_features: C.
        eps: added to the variance.
        momentum: running-average momentum (None: cumulative average).
        affine: learn a per-channel scale and shift.
        track_running_stats: keep running statistics.
        process_group: the ranks to synchronize over (default: all).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        if not (self.training and group is not None and dist.get_world_size(group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        # (M, C, *) -> (C, rows); half types reduce in float32 (the row count too must stay exact)
        x = input.transpose(0, 1).reshape(channels, -1)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local = torch.cat([x.sum(1), x.new_tensor([x.shape[1]])])
        total = _AllReduceSum.apply(local, group)
        count = total[-1].detach()
        mean = total[:-1] / count
        sq_dev = _AllReduceSum.apply(((x - mean[:, None]) ** 2).sum(1), group)
        var = sq_dev / count  # biased, as BatchNorm normalizes with
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(count))
        shape = (1, channels) + (1,) * (input.dim() - 2)
        out = (input.to(mean.dtype) - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def refuse_ghost_bn(module: nn.Module) -> None:
    """Raises ValueError when ``module`` holds ghost BN: its training path normalizes each sub-batch with its own
    statistics, bypassing the inner BatchNorm, so a SyncBN conversion would silently leave it unsynchronized."""
    from vitbn.models.norms import TokenBatchNorm

    sizes = sorted({m.ghost_batch_size for m in module.modules() if isinstance(m, TokenBatchNorm)} - {None})
    if sizes:
        raise ValueError(
            f"SyncBN and ghost BN (ghost_batch_size={sizes[0]}) exclude each other: SyncBN normalizes over the whole "
            "global batch, ghost BN over sub-batches; set the ghost batch size to None first"
        )


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replaces every BatchNorm of ``module`` by an ``AllReduceSyncBatchNorm`` sharing its tensors.

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``, which builds the CUDA-only ``nn.SyncBatchNorm``. Returns
    the converted module (a new one if ``module`` itself is a BatchNorm). A module with ghost BN is refused
    (``refuse_ghost_bn``).
    """
    refuse_ghost_bn(module)
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, AllReduceSyncBatchNorm):
        out = AllReduceSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group,
        )  # fmt: skip
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group))
    return out
