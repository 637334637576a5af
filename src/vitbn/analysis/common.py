"""What the loss-geometry analyses share: the fixed image set, the model's mode during an analysis, the mean
loss over the set, and the partition of the parameters into blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from vitbn.bn.frozen import kept_bn_stats
from vitbn.models import norms as norm_layers

# A fixed image set: normalized (x, y) batches on the model's device, in a fixed order.
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]

# "eval": BatchNorm with its running statistics (the loss is a deterministic function of the weights);
# "train": BatchNorm with the statistics of each batch (running statistics kept as they were).
BN_MODES = ("eval", "train")


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r} is not one of {', '.join(repr(m) for m in BN_MODES)}")


def is_bn_norm(module: nn.Module) -> bool:
    """A BatchNorm, or a norm of ``vitbn.models.norms`` holding one (TokenBatchNorm, RepBN, PRepBN, ...)."""
    if isinstance(module, _BatchNorm):
        return True
    return type(module).__module__ == norm_layers.__name__ and any(isinstance(m, _BatchNorm) for m in module.modules())


@contextmanager
def analysis_mode(model: nn.Module, bn_mode: str = "eval", *, math_attention: bool = False) -> Iterator[None]:
    """The model in eval mode (dropout and stochastic depth off) inside the block; with ``bn_mode="train"`` the
    BatchNorm norms (``is_bn_norm``) alone in training mode, normalizing with batch statistics, their running
    statistics restored on exit (``kept_bn_stats``). Every module's train/eval flag is restored on exit.

    Args:
        model: the model.
        bn_mode: ``"eval"`` or ``"train"`` (see ``BN_MODES``).
        math_attention: compute attention with ``scaled_dot_product_attention``'s math kernel (batched
            matmul-softmax-matmul), whose backward can be differentiated again, for Hessian-vector products: the
            fused CUDA kernels cannot.
    """
    check_bn_mode(bn_mode)
    flags = [(m, m.training) for m in model.modules()]
    impls = [(m, m.impl) for m in model.modules() if math_attention and hasattr(m, "impl") and hasattr(m, "heads")]
    with ExitStack() as stack:
        stack.callback(lambda: [setattr(m, "training", t) for m, t in flags])
        stack.callback(lambda: [setattr(m, "impl", i) for m, i in impls])
        model.eval()
        if math_attention:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        for m, _ in impls:
            m.impl = "fused"
        if bn_mode == "train":
            stack.enter_context(kept_bn_stats(model))
            for m in model.modules():
                if is_bn_norm(m):
                    m.training = True  # this module only: the flag of its children is theirs
        yield


def num_images(batches: Batches) -> int:
    return sum(len(y) for _, y in batches)


def mean_loss(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """The mean cross-entropy and the accuracy of ``model`` (in the mode it is in) over all images of
    ``batches``, without gradients."""
    total, loss, right = num_images(batches), 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            right += int((logits.argmax(dim=1) == y).sum())
    return loss / total, right / total


def parameter_blocks(model: nn.Module) -> OrderedDict[str, list[nn.Parameter]]:
    """The trainable parameters of a VisionTransformer in blocks, in forward order: ``embed`` (the stem,
    ``cls_token``, a learned ``pos_embedding``), ``block{i}.attn`` and ``block{i}.mlp`` for each stage ``i``
    (1-based; a sub-block with its pre-norm and its LayerScale), ``head`` (the final norm and ``mlp_head``).
    Every trainable parameter is in exactly one block."""
    blocks: OrderedDict[str, list[nn.Parameter]] = OrderedDict()
    embed = list(model.to_patch_embedding.parameters())
    embed += [p for p in (model.cls_token, model.pos_embedding) if isinstance(p, nn.Parameter)]
    blocks["embed"] = embed
    for i, layer in enumerate(model.transformer.layers, start=1):
        blocks[f"block{i}.attn"] = [*layer.attn.parameters(), *_params(getattr(layer, "attn_scale", None))]
        blocks[f"block{i}.mlp"] = [*layer.ff.parameters(), *_params(getattr(layer, "ff_scale", None))]
    blocks["head"] = [*model.transformer.norm.parameters(), *model.mlp_head.parameters()]
    return OrderedDict((name, [p for p in params if p.requires_grad]) for name, params in blocks.items())


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return list(module.parameters()) if module is not None else []
