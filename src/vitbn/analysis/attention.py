"""Attention maps of a VisionTransformer: the weights of every layer and head, the pooled token's attention
over the patches, and attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

The weights come from ``forward_with_attn``: the plain path returns them with its output, and the fused path
computes them beside its output; either way the logits are those of the model's forward, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def attention_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and the attention weights of every layer, stacked (B, L, H, N, N), of ``model`` in eval
    mode on normalized ``images`` (B, C, H, W). A stage of ``parallel`` branches contributes its K*H heads."""
    was_training = model.training
    model.eval()
    try:
        logits, maps = model.forward_with_attn(images)
    finally:
        model.train(was_training)
    return logits, torch.stack([m.float() for m in maps], dim=1)


def rollout(maps: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout: with ``A_l = residual * I + (1 - residual) * mean_heads(W_l)`` (rows renormalized, the
    residual connection as identity attention), ``R = A_L @ ... @ A_1``, (B, N, N): row i is how much each
    input token flows into output token i through all layers.

    Args:
        maps: (B, L, H, N, N) attention weights, rows summing to 1.
        residual: weight of the identity; 0.5 as in the paper.
    """
    if maps.ndim != 5 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be (B, L, H, N, N), got {tuple(maps.shape)}")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual={residual} must be in [0, 1)")
    b, layers, _, n, _ = maps.shape
    eye = torch.eye(n, dtype=maps.dtype, device=maps.device)
    result = eye.expand(b, n, n)
    for layer in range(layers):
        a = residual * eye + (1.0 - residual) * maps[:, layer].mean(dim=1)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result  # later layers act on what the earlier ones produced
    return result


def patch_attention(flow: torch.Tensor, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
    """What the pooled representation attends to, over the patch grid: (B, N, N) (a rollout, or one layer's
    head-mean weights) -> (B, gh, gw), each map summing to 1 over the patches.

    With a class token, its row over the patch tokens; with mean pooling (no class token), the mean of all rows,
    as the pooled vector is the mean of all output tokens.
    """
    gh, gw = grid
    if class_token:
        rows = flow[:, 0, 1:]
    else:
        rows = flow.mean(dim=1)
    if rows.shape[-1] != gh * gw:
        raise ValueError(f"{rows.shape[-1]} patch tokens do not make a {gh}x{gw} grid")
    rows = rows / rows.sum(dim=-1, keepdim=True)
    return rows.reshape(-1, gh, gw)
