"""Loading vit-pytorch ``ViT`` checkpoints into ``vitbn.ViT``.

Two layouts exist: the older one (vit-pytorch <= 1.7 or so) with ``cls_token`` (1, 1, D) always present and
``pos_embedding`` (1, N+1, D), and the current one with ``cls_token`` (1, D) only for CLS pooling ((0, D)
otherwise) and ``pos_embedding`` (N[+1], D). Below the top level only the names differ.
"""

from __future__ import annotations

import re

import torch

from vitbn.config import NORM_SLOTS
from vitbn.models.vit import ViT

VIT_PYTORCH_NORMS = ("layer", "batch", "none")

# vit-pytorch name -> vitbn name (regex on the full key; the block index is kept).
_RENAMES = (
    (r"^to_patch_embedding\.1\.", "to_patch_embedding.norm_in."),
    (r"^to_patch_embedding\.2\.", "to_patch_embedding.proj."),
    (r"^to_patch_embedding\.3\.", "to_patch_embedding.norm_out."),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"transformer.layers.\1.attn.norm."),
    (r"^transformer\.layers\.(\d+)\.0\.to_qkv\.", r"transformer.layers.\1.attn.to_qkv."),
    (r"^transformer\.layers\.(\d+)\.0\.to_out\.0\.", r"transformer.layers.\1.attn.to_out."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.0\.", r"transformer.layers.\1.ff.norm."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.1\.", r"transformer.layers.\1.ff.fc1."),
    (r"^transformer\.layers\.(\d+)\.1\.net\.4\.", r"transformer.layers.\1.ff.fc2."),
)
_KEPT = re.compile(r"^(transformer\.norm\.|mlp_head\.)")


def is_old_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    """True for the older vit-pytorch layout (``cls_token`` of shape (1, 1, D))."""
    return "cls_token" in state_dict and state_dict["cls_token"].dim() == 3


def convert_vit_pytorch_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames and reshapes a vit-pytorch ``ViT`` state_dict into ``vitbn.ViT``'s.

    Raises:
        ValueError: a key that belongs to no known vit-pytorch ``ViT`` layout.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "cls_token":
            value = value.reshape(-1, value.shape[-1])  # (1, 1, D) or (k, D) -> (k, D)
            if value.shape[0]:
                out[key] = value
            continue
        if key == "pos_embedding":
            out[key] = value.reshape(-1, value.shape[-1])  # (1, N, D) -> (N, D)
            continue
        for pattern, replacement in _RENAMES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                out[new_key] = value
                break
        else:
            if not _KEPT.match(key):
                raise ValueError(f"key {key!r} is not part of a vit-pytorch ViT state_dict")
            out[key] = value
    return out


def vit_from_vit_pytorch(state_dict: dict[str, torch.Tensor], **vit_kwargs) -> ViT:
    """Builds a ``vitbn.ViT`` with vit-pytorch's constructor keywords and loads a vit-pytorch state_dict.

    The older layout always carries a CLS token (also under mean pooling, where it is averaged with the patch
    tokens), so ``class_token=True`` is set for it.

    Example:
        >>> model = vit_from_vit_pytorch(torch.load("vit.pt"), image_size=28, patch_size=7, num_classes=10,
        ...                              dim=64, depth=6, heads=8, mlp_dim=128, channels=1)
    """
    if vit_kwargs.get("parallel", 1) != 1 or vit_kwargs.get("stem", "linear") != "linear":
        raise ValueError(
            "vit-pytorch checkpoints hold sequential blocks and a linear patch embedding: they do not load into "
            f"parallel={vit_kwargs.get('parallel', 1)}, stem={vit_kwargs.get('stem', 'linear')!r}"
        )
    if is_old_layout(state_dict):
        vit_kwargs.setdefault("class_token", True)
    model = ViT(**vit_kwargs)
    for slot in NORM_SLOTS:
        kind = getattr(model.config, slot)
        if kind not in VIT_PYTORCH_NORMS:
            raise ValueError(
                f"vit-pytorch has no {kind!r} norm ({slot}): its checkpoints hold LayerNorm (or BatchNorm in the "
                "study's fork) only"
            )
    model.load_state_dict(convert_vit_pytorch_state_dict(state_dict), strict=True)
    return model
