"""Active neurons and weight norms: how much of each feed-forward layer is in use, and how large each block is.

A hidden unit of a feed-forward block is active on a token when the input of its GELU is positive (after fc1
and, in the BN variants, the inner BatchNorm). The fraction counts elements over images x tokens x hidden
units, and over the branches of a parallel stage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitbn.analysis.common import Batches, analysis_mode, parameter_blocks


def active_fraction(model: nn.Module, batches: Batches) -> dict[str, float]:
    """The fraction of positive GELU inputs of each stage's feed-forward block (``block{i}``, 1-based) over all
    images of ``batches``, in eval mode. The hooks on ``block.ff.act`` are removed afterwards, and the logits are
    those of a plain forward pass."""
    counts = {}
    handles = []

    def count(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            h = inputs[0]  # (B, N, hidden) for a block, (K, B*N, hidden) for K parallel branches
            positive, total = counts.get(name, (0, 0))
            counts[name] = (positive + int((h > 0).sum()), total + h.numel())

        return hook

    try:
        for i, layer in enumerate(model.transformer.layers, start=1):
            handles.append(layer.ff.act.register_forward_pre_hook(count(f"block{i}")))
        with analysis_mode(model, "eval"), torch.inference_mode():
            for x, _ in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: positive / total for name, (positive, total) in counts.items()}


def weight_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of all parameters of each block of ``parameter_blocks`` (as one vector)."""
    with torch.no_grad():
        return {
            name: math.sqrt(sum(float(p.double().pow(2).sum()) for p in params))
            for name, params in parameter_blocks(model).items()
        }
