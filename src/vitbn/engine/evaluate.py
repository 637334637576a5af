"""Evaluation: loss, accuracy, per-class accuracy and the confusion matrix, timed apart from training."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from vitbn.engine.checkpoint import unwrap
from vitbn.engine.device import make_amp
from vitbn.engine.step import eval_batch
from vitbn.engine.timing import Stopwatch


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    num_classes: int | None = None,
) -> dict:
    """Runs ``model`` in eval mode under ``torch.inference_mode()`` over ``loader``.

    Args:
        model: a classifier; restored to its previous train/eval mode afterwards.
        loader: yields ``(x, y)`` batches.
        device: where to evaluate (the model is moved there); None: where the model's parameters are.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        num_classes: K; None: ``model.config.num_classes``.

    Returns:
        ``{"loss": mean cross-entropy per image, "acc": fraction correct, "per_class_acc": K fractions (NaN for
        a class absent from the data), "confusion": (K, K) int64 CPU tensor (rows: true, columns: predicted),
        "seconds": wall-clock seconds, "num_samples": images}``.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    k = num_classes or getattr(getattr(unwrap(model), "config", None), "num_classes", None)
    if not k:
        raise ValueError("evaluate: pass num_classes for a model without config.num_classes")
    amp = make_amp(precision, device, training=False)
    was_training = model.training
    model.eval()
    try:
        with Stopwatch(device) as watch, torch.inference_mode():
            confusion = torch.zeros(k, k, dtype=torch.long, device=device)
            loss_sum = torch.zeros((), device=device)
            for x, y in loader:
                loss_sum += eval_batch(model, x.to(device, non_blocking=True), y.to(device), confusion, amp=amp)
    finally:
        model.train(was_training)
    return summarize(confusion.cpu(), float(loss_sum), watch.seconds)


def summarize(confusion: torch.Tensor, loss_sum: float, seconds: float) -> dict:
    """The metrics of a (K, K) confusion matrix and a summed loss."""
    n = int(confusion.sum())
    per_class_n = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [float(c) / int(m) if int(m) else math.nan for c, m in zip(correct.tolist(), per_class_n.tolist())]
    return {
        "loss": loss_sum / n if n else math.nan,
        "acc": int(correct.sum()) / n if n else math.nan,
        "per_class_acc": per_class,
        "confusion": confusion,
        "seconds": seconds,
        "num_samples": n,
    }
