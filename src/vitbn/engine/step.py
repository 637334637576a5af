"""One optimization step and one evaluation batch; no host-device synchronization in either."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.engine.device import Amp

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy over the batch, computed in fp32 whatever the autocast dtype of the logits."""

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)

    return loss_fn


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    amp: Amp,
    grad_clip: float | None = None,
    clip_params: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, (clip,) update. Returns the detached batch loss and the number of correct
    predictions, both still on the device.

    Args:
        model: in training mode.
        x: (B, C, H, W) images.
        y: (B,) int64 labels.
        optimizer: updated in place.
        loss_fn: ``(logits, y) -> scalar``.
        amp: autocast and, for fp16, the GradScaler.
        grad_clip: max global gradient norm, or None.
        clip_params: the parameters whose norm is clipped (default: all of ``model``).
    """
    with amp.autocast():
        logits = model(x)  # (B, K)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler = amp.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(clip_params or list(model.parameters()), grad_clip, foreach=True)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(clip_params or list(model.parameters()), grad_clip, foreach=True)
        optimizer.step()
    return loss.detach(), (logits.detach().argmax(dim=-1) == y).sum()


def eval_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, confusion: torch.Tensor, *, amp: Amp
) -> torch.Tensor:
    """Adds a batch's counts to ``confusion`` (K, K) int64 (rows: true class, columns: predicted) and returns
    the summed cross-entropy. Call under ``torch.inference_mode()`` with the model in eval mode.
    ``index_add_`` rather than ``bincount``, which synchronizes on CUDA to size its output."""
    k = confusion.shape[0]
    with amp.autocast():
        logits = model(x)  # (B, K)
    loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
    flat = y * k + logits.argmax(dim=-1)  # (B,) index into the flattened (K*K) matrix
    confusion.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return loss_sum
