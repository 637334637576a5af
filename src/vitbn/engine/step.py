"""One optimization step and one evaluation batch; no host-device synchronization in either."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.bn.frozen import kept_bn_stats
from vitbn.engine.device import Amp
from vitbn.engine.sam import SAM, RandomReplay

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy over the batch, computed in fp32 whatever the autocast dtype of the logits. The target
    is (B,) class indices or (B, K) class probabilities (Mixup, CutMix); label smoothing applies to both."""

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
    sam: SAM | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, (clip,) update. Returns the detached batch loss and the number of correct
    predictions, both still on the device.

    With ``sam``, a second forward/backward at the perturbed weights w + ε̂ (same batch, same BatchNorm mode and
    random draws, running statistics untouched) gives the gradient the update uses; the returned loss and hits
    are those at w.

    Args:
        model: in training mode.
        x: (B, C, H, W) images.
        y: (B,) int64 labels, or (B, K) soft targets (mixed images; a hit is the top prediction matching the
            target's largest class).
        optimizer: updated in place.
        loss_fn: ``(logits, y) -> scalar``.
        amp: autocast and, for fp16, the GradScaler.
        grad_clip: max global gradient norm, or None.
        clip_params: the parameters whose norm is clipped (default: all of ``model``).
        sam: a ``SAM`` around ``optimizer``, or None for a plain step.
    """
    replay = RandomReplay(x.device) if sam is not None else None
    with amp.autocast():
        logits = model(x)  # (B, K)
    loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    _backward(loss, amp)
    if sam is not None:
        sam.perturb()
        replay.replay()  # the same dropout / drop-path masks as the first pass
        with kept_bn_stats(model):  # BN normalizes with this batch's statistics but its running averages stay
            with amp.autocast():
                perturbed = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            _backward(perturbed, amp)
        sam.restore()
    _update(model, optimizer, amp, grad_clip, clip_params)
    labels = y if y.ndim == 1 else y.argmax(dim=-1)
    return loss.detach(), (logits.detach().argmax(dim=-1) == labels).sum()


def _backward(loss: torch.Tensor, amp: Amp) -> None:
    (amp.scaler.scale(loss) if amp.scaler is not None else loss).backward()


def _update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    amp: Amp,
    grad_clip: float | None,
    clip_params: Sequence[torch.Tensor] | None,
) -> None:
    scaler = amp.scaler
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(clip_params or list(model.parameters()), grad_clip, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


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
