"""Folding BatchNorm into the neighbouring Linear layers for inference.

In eval mode a BatchNorm is the affine map ``y = x * scale + shift`` (per feature, or one scalar pair for
``bn_stats="scalar"``). Before a Linear ``W x + b`` it folds as ``W' = W diag(scale)``, ``b' = b + W shift``;
after one as ``W' = diag(scale) W``, ``b' = scale * b + shift``. RepBN (``BN(x) + eta * x``) is the affine map
``(scale + eta) x + shift`` and folds the same way; a PRepBN folds once its lambda is 0 (RepBN alone). LayerNorm
and RMSNorm depend on the sample and DyT is nonlinear: they stay (``unfolded_norms`` says which).

A norm folded into the attention's qkv product gives it a bias, ``b_q``, ``b_k``, ``b_v`` per head, which
attention makes mostly redundant (``_fold_attention_biases``); the folded model runs the products of the LayerNorm
model (whose qkv product has no bias) and no 3*H*Dh-wide bias.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.bn.frozen import FrozenBatchNorm
from vitbn.models.attention import AttentionCore
from vitbn.models.blocks import ParallelBlock
from vitbn.models.layers import BranchLinear, PatchEmbed
from vitbn.models.norms import ChannelsLast, DyT, PRepBN, RepBN, TokenBatchNorm
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


def _norm_map(norm: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` expanded to ``width`` features if ``norm`` is an affine map in eval mode (a token or
    channel BatchNorm, a RepBN, a PRepBN at lambda 0), else None. A PRepBN still blending in its LayerNorm raises
    a ValueError: it is not affine yet."""
    if isinstance(norm, ChannelsLast):
        norm = norm.norm
    if isinstance(norm, PRepBN):
        if norm.phase != "repbn":
            raise ValueError(
                f"fuse_bn cannot fold a PRepBN at lambda={float(norm.lam):.4g}: it is affine only at lambda = 0 "
                "(train to the end of its ramp, train.prepbn_warmup_steps + train.prepbn_decay_steps)"
            )
        norm = norm.repbn
    if isinstance(norm, RepBN):
        scale, shift = bn_scale_shift(norm.bn.bn)
        scale = scale + norm.eta.double()  # BN(x) + eta * x
    elif isinstance(norm, TokenBatchNorm):
        scale, shift = bn_scale_shift(norm.bn)
    elif isinstance(norm, (_BatchNorm, FrozenBatchNorm)):
        scale, shift = bn_scale_shift(norm)
    else:
        return None
    return scale.expand(width), shift.expand(width)  # a scalar-stats BN has (1,): the same map on every feature


def _before(affine, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm ``x * scale + shift`` folded into the (out, in) map ``w x + b`` after it."""
    scale, shift = affine
    return w * scale[None, :], b + w @ shift


def _after(affine, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm folded into the map before it; ``w`` (out, ...) may be a Linear's or a convolution's weight."""
    scale, shift = affine
    return w * scale.reshape(-1, *(1,) * (w.dim() - 1)), b * scale + shift


def _set_params(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    ref = module.weight
    module.weight = nn.Parameter(weight.to(ref.dtype), requires_grad=ref.requires_grad)
    module.bias = nn.Parameter(bias.to(ref.dtype), requires_grad=ref.requires_grad)  # to_qkv gains a bias


def _bias64(module: nn.Module, out_shape: tuple[int, ...]) -> torch.Tensor:
    if module.bias is None:
        return module.weight.new_zeros(out_shape, dtype=torch.float64)
    return module.bias.double()


def _fold_linear(parent: nn.Module, name: str, linear: nn.Linear, fold) -> bool:
    """Folds the norm ``parent.<name>`` into ``linear`` (``fold``: ``_before`` or ``_after`` it); True if it
    was a BatchNorm, which becomes an Identity."""
    width = linear.in_features if fold is _before else linear.out_features
    affine = _norm_map(getattr(parent, name), width)
    if affine is None:
        return False
    _set_params(linear, *fold(affine, linear.weight.double(), _bias64(linear, (linear.out_features,))))
    setattr(parent, name, nn.Identity())
    return True


def _fold_branches(norms: nn.ModuleList, linear: BranchLinear, fold) -> bool:
    """Folds the K norms of a parallel stage into the K branches of ``linear``."""
    width = linear.in_features if fold is _before else linear.out_features
    affines = [_norm_map(norm, width) for norm in norms]
    if any(a is None for a in affines):
        return False
    bias = _bias64(linear, (linear.branches, linear.out_features))
    folded = [fold(a, linear.weight[k].double(), bias[k]) for k, a in enumerate(affines)]
    _set_params(linear, torch.stack([w for w, _ in folded]), torch.stack([b for _, b in folded]))
    for k in range(len(norms)):
        norms[k] = nn.Identity()
    return True


def _fold_stem(stem: nn.Module) -> bool:
    """Folds every BatchNorm2d (and channel RepBN / PRepBN) of a conv/hMLP stem into the convolution before it."""
    layers, found = stem.proj, False
    for i in range(1, len(layers)):
        conv = layers[i - 1]
        affine = _norm_map(layers[i], conv.out_channels) if isinstance(conv, nn.Conv2d) else None
        if affine is not None:
            _set_params(conv, *_after(affine, conv.weight.double(), _bias64(conv, (conv.out_channels,))))
            layers[i], found = nn.Identity(), True
    return found


class OutputShift(nn.Module):
    """Adds a constant vector: the value bias of an attention without an output projection (heads = 1 and
    dim_head = dim, where vit-pytorch skips it), which has no bias to take it."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.shift = nn.Parameter(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def _fold_attention_biases(attn: AttentionCore) -> None:
    """Removes the bias of the qkv product (``b_q``, ``b_k``, ``b_v``, per head) exactly.

    With ``s_ij = scale * (q_i + b_q) . (k_j + b_k)``, the scores of query i over the keys j, and
    ``o_i = sum_j softmax_j(s_ij) (v_j + b_v)``:

    - Key bias: ``s_ij = scale * (q_i + b_q) . k_j + scale * (q_i + b_q) . b_k``; the second term is the same for
      every key j of query i, and softmax is invariant to adding a constant to a row: ``b_k`` is dropped.
    - Value bias: the weights of a row sum to 1, so ``o_i = sum_j w_ij v_j + b_v``, and the output projection
      gives ``W_o o_i + b_o = W_o sum_j w_ij v_j + (b_o + W_o b_v)``: ``b_v`` moves into the output bias.
    - Query bias: ``scale * (q_i + b_q) . k_j = scale * q_i . k_j + c_j`` with ``c_j = scale * b_q . k_j``, one term
      per key (and head) added to every query's scores. As ``k_j = W_k x_j``, ``c_j = u . x_j`` with
      ``u = scale * W_k^T b_q`` (a row of the input's width per head): the qkv product gains H output features
      (H rows of its weight), and attention adds ``c`` to the scores (``key_term``: the fused kernel's additive
      mask, the plain path's batched product's input). That is H / (3*H*Dh) more product, and no pass over the
      3*H*Dh-wide projection; a narrow add on q would be one more pass over a third of it.
    """
    qkv, h, dh = attn.to_qkv, attn.heads, attn.dim_head
    if qkv.bias is None:
        return
    ref, inner = qkv.weight, h * dh
    branches = ref.shape[0] if ref.dim() == 3 else 1
    w = ref.double().reshape(branches, 3 * inner, -1)  # (K, 3*H*Dh, D)
    b_q, _, b_v = qkv.bias.double().reshape(branches, 3, inner).unbind(1)  # b_k: dropped
    w_k = w[:, inner : 2 * inner].reshape(branches, h, dh, -1)
    u = attn.scale * torch.einsum("khd,khdi->khi", b_q.reshape(branches, h, dh), w_k)  # (K, H, D)
    keyed = bool(b_q.any())
    if keyed:
        w = torch.cat([w, u], dim=1)  # (K, 3*H*Dh + H, D)
    qkv.out_features, attn.key_term = w.shape[1], keyed
    w = w.reshape(-1, w.shape[-1]) if ref.dim() == 2 else w
    qkv.weight = nn.Parameter(w.to(ref.dtype), requires_grad=ref.requires_grad)
    qkv.bias = None
    out = attn.to_out
    if isinstance(out, nn.Identity):
        attn.to_out = OutputShift(b_v.reshape(inner).to(ref.dtype))
        return
    w_o = out.weight.double().reshape(branches, -1, inner)  # (K, D, H*Dh)
    bias = out.bias.double() + (w_o @ b_v.unsqueeze(-1)).reshape(out.bias.shape)
    out.bias = nn.Parameter(bias.to(out.bias.dtype), requires_grad=out.bias.requires_grad)


def _fold_block(block: nn.Module) -> set[str]:
    attn, ff, folded = block.attn, block.ff, set()
    if isinstance(block, ParallelBlock):
        pairs = [("attn_norm", attn.norms, attn.to_qkv, _before), ("ffn_norm", ff.norms, ff.fc1, _before),
                 ("ffn_inner_norm", ff.inner_norms, ff.fc1, _after)]  # fmt: skip
        folded = {slot for slot, norms, linear, fold in pairs if _fold_branches(norms, linear, fold)}
        _fold_attention_biases(attn)
        return folded
    if _fold_linear(attn, "norm", attn.to_qkv, _before):
        folded.add("attn_norm")
        _fold_attention_biases(attn)
    if _fold_linear(ff, "norm", ff.fc1, _before):
        folded.add("ffn_norm")
    if _fold_linear(ff, "inner_norm", ff.fc1, _after):
        folded.add("ffn_inner_norm")
    return folded


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, FrozenBatchNorm, TokenBatchNorm, RepBN, PRepBN))


# Norms that never fold, and why (the wording of ``unfolded_norms``).
_UNFOLDABLE = ((nn.LayerNorm, "LayerNorm", "depends on the sample"), (nn.RMSNorm, "RMSNorm", "depends on the sample"),
               (DyT, "DyT", "tanh is nonlinear"))  # fmt: skip


def unfolded_norms(model: nn.Module) -> str | None:
    """One line on the norms that a model folded by ``fuse_bn`` still holds and why, or None when it holds none,
    e.g. ``"fuse_bn left 25 norm(s) unfolded: 25 DyT (tanh is nonlinear)"``."""
    counts: dict[tuple[str, str], int] = {}
    for module in getattr(model, "module", model).modules():
        for cls, name, why in _UNFOLDABLE:
            if isinstance(module, cls):
                counts[(name, why)] = counts.get((name, why), 0) + 1
    if not counts:
        return None
    parts = ", ".join(f"{n} {name} ({why})" for (name, why), n in counts.items())
    return f"fuse_bn left {sum(counts.values())} norm(s) unfolded: {parts}"


@torch.no_grad()
def fuse_bn(model: nn.Module) -> VisionTransformer:
    """An inference copy of ``model`` with every BatchNorm folded into its neighbouring Linear.

    Folded: the patch embedding's ``norm_in`` (into ``proj``, before it) and ``norm_out`` (into ``proj``,
    after it), or every BatchNorm2d of an hMLP/conv stem (into the convolution before it); per block (per branch
    of a parallel stage) the attention pre-norm (into ``to_qkv``; the bias this gives it is then removed:
    ``_fold_attention_biases``), the feed-forward
    pre-norm (into ``fc1``) and the inner norm after ``fc1`` (into ``fc1``); the final norm (into ``mlp_head``:
    only the head consumes the transformer's output, and both CLS and mean pooling commute with a per-feature
    affine map). Folded norms become ``nn.Identity``, so the copy is a plain ``VisionTransformer`` whose
    ``config`` names them ``"none"``; its outputs equal the eval-mode original's. Frozen, ghost and scalar-stats
    BatchNorms fold the same way. LayerNorms stay. The copy is for inference: its state dict (a ``to_qkv`` with
    H more output features when the query bias is not zero) does not load into a model built from a config.

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
    if isinstance(pe, PatchEmbed):
        if _fold_linear(pe, "norm_in", pe.proj, _before) | _fold_linear(pe, "norm_out", pe.proj, _after):
            folded.add("embed_norm")
    elif _fold_stem(pe):
        folded.add("embed_norm")
    for block in fused.transformer.layers:
        folded |= _fold_block(block)
    if _fold_linear(fused.transformer, "norm", fused.mlp_head, _before):
        folded.add("final_norm")
    left = [name for name, m in fused.named_modules() if _is_batchnorm(m)]
    if left:
        raise ValueError(f"fuse_bn cannot fold the BatchNorm(s) at {left}: no Linear next to them")
    fused.config = dataclasses.replace(fused.config, **dict.fromkeys(folded, "none"))
    return fused
