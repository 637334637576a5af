"""Folding BatchNorm into the neighbouring Linear layers for inference.

In eval mode a BatchNorm is the affine map ``y = x * scale + shift`` (per feature, or one scalar pair for
``bn_stats="scalar"``). Before a Linear ``W x + b`` it folds as ``W' = W diag(scale)``, ``b' = b + W shift``;
after one as ``W' = diag(scale) W``, ``b' = scale * b + shift``. LayerNorm depends on the sample and is not
foldable; it stays.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.bn.frozen import FrozenBatchNorm
from vitbn.models.norms import TokenBatchNorm
from vitbn.models.vit import VisionTransformer


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode map of a BatchNorm (``_BatchNorm`` or ``FrozenBatchNorm``) as float64 (C,) tensors."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fold {bn}: without running statistics it normalizes with batch statistics")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _token_bn_map(norm: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` expanded to ``width`` features if ``norm`` is a token BatchNorm, else None."""
    if not isinstance(norm, TokenBatchNorm):
        return None
    scale, shift = bn_scale_shift(norm.bn)
    return scale.expand(width), shift.expand(width)  # a scalar-stats BN has (1,): the same map on every feature


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    ref = linear.weight
    linear.weight = nn.Parameter(weight.to(ref.dtype), requires_grad=ref.requires_grad)
    linear.bias = nn.Parameter(bias.to(ref.dtype), requires_grad=ref.requires_grad)  # to_qkv gains a bias


def _bias64(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        return linear.weight.new_zeros(linear.out_features, dtype=torch.float64)
    return linear.bias.double()


def _fold_before(parent: nn.Module, name: str, linear: nn.Linear) -> bool:
    """Folds the norm ``parent.<name>`` that feeds ``linear``; True if it was a BatchNorm."""
    affine = _token_bn_map(getattr(parent, name), linear.in_features)
    if affine is None:
        return False
    scale, shift = affine
    w = linear.weight.double()
    _set_linear(linear, w * scale[None, :], _bias64(linear) + w @ shift)
    setattr(parent, name, nn.Identity())
    return True


def _fold_after(parent: nn.Module, name: str, linear: nn.Linear) -> bool:
    """Folds the norm ``parent.<name>`` that consumes ``linear``'s output; True if it was a BatchNorm."""
    affine = _token_bn_map(getattr(parent, name), linear.out_features)
    if affine is None:
        return False
    scale, shift = affine
    _set_linear(linear, linear.weight.double() * scale[:, None], _bias64(linear) * scale + shift)
    setattr(parent, name, nn.Identity())
    return True


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, FrozenBatchNorm, TokenBatchNorm))


@torch.no_grad()
def fuse_bn(model: nn.Module) -> VisionTransformer:
    """An inference copy of ``model`` with every BatchNorm folded into its neighbouring Linear.

    Folded: the patch embedding's ``norm_in`` (into ``proj``, before it) and ``norm_out`` (into ``proj``,
    after it); per block the attention pre-norm (into ``to_qkv``, which gains a bias), the feed-forward
    pre-norm (into ``fc1``) and the inner norm after ``fc1`` (into ``fc1``); the final norm (into ``mlp_head``:
    only the head consumes the transformer's output, and both CLS and mean pooling commute with a per-feature
    affine map). Folded norms become ``nn.Identity``, so the copy is a plain ``VisionTransformer`` whose
    ``config`` names them ``"none"``; its outputs equal the eval-mode original's. Frozen, ghost and scalar-stats
    BatchNorms fold the same way. LayerNorms stay. The copy is for inference: its state dict (``to_qkv.bias``)
    does not load into a model built from a config.

    Args:
        model: an eval-mode ``VisionTransformer`` (possibly DDP-wrapped).
    """
    model = getattr(model, "module", model)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"fuse_bn folds a VisionTransformer, got {type(model).__name__}")
    if model.training or any(m.training for m in model.modules() if _is_batchnorm(m)):
        raise ValueError("fuse_bn needs an eval-mode model: call model.eval() first")
    fused = copy.deepcopy(model).eval()
    folded = set()
    pe = fused.to_patch_embedding
    if _fold_before(pe, "norm_in", pe.proj) | _fold_after(pe, "norm_out", pe.proj):
        folded.add("embed_norm")
    for block in fused.transformer.layers:
        attn, ff = block.attn, block.ff
        if _fold_before(attn, "norm", attn.to_qkv):
            folded.add("attn_norm")
        if _fold_before(ff, "norm", ff.fc1):
            folded.add("ffn_norm")
        if _fold_after(ff, "inner_norm", ff.fc1):
            folded.add("ffn_inner_norm")
    if _fold_before(fused.transformer, "norm", fused.mlp_head):
        folded.add("final_norm")
    left = [name for name, m in fused.named_modules() if _is_batchnorm(m)]
    if left:
        raise ValueError(f"fuse_bn cannot fold the BatchNorm(s) at {left}: no Linear next to them")
    fused.config = dataclasses.replace(fused.config, **dict.fromkeys(folded, "none"))
    return fused
