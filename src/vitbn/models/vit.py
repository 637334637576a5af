"""One VisionTransformer for every variant; the variants differ only in which norm sits where."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vitbn.config import VARIANT_NORMS, ModelConfig, pair
from vitbn.models.blocks import Transformer
from vitbn.models.layers import PatchEmbed, dropout_or_identity, sincos_1d, sincos_2d
from vitbn.models.norms import norm_options
from vitbn.models.stems import ConvStem, HMLPStem


class VisionTransformer(nn.Module):
    """A ViT configured by a ``ModelConfig``: stem (linear patch embedding, hMLP or conv), optional CLS token,
    position embedding, ``depth`` pre-norm stages (sequential blocks or ``parallel`` branches each, with optional
    LayerScale and stochastic depth), final norm, linear head. Submodule names follow vit-pytorch's ``ViT``
    (``to_patch_embedding``, ``cls_token``, ``pos_embedding``, ``transformer``, ``mlp_head``).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        image, patch = pair(c.image_size), pair(c.patch_size)
        if c.stem == "linear":
            self.to_patch_embedding = PatchEmbed(
                image_size=image, patch_size=patch, channels=c.channels, dim=c.dim, norm=c.embed_norm, **norm_options(c)
            )
        else:
            self.to_patch_embedding = HMLPStem(c) if c.stem == "hmlp" else ConvStem(c)
        self.cls_token = nn.Parameter(torch.randn(1, c.dim)) if c.has_class_token else None
        if c.pos_emb == "learn":
            self.pos_embedding = nn.Parameter(torch.randn(c.num_tokens, c.dim))
        else:
            self.register_buffer("pos_embedding", self._sincos_table(), persistent=False)
        self.dropout = dropout_or_identity(c.emb_dropout)
        self.transformer = Transformer(c)
        self.mlp_head = nn.Linear(c.dim, c.num_classes)

    def _sincos_table(self) -> torch.Tensor:
        c = self.config
        if c.pos_emb == "pe1d":
            return sincos_1d(c.num_tokens, c.dim)
        table = sincos_2d(*self.to_patch_embedding.grid, c.dim)
        if c.has_class_token:  # the CLS token has no position: a zero row
            table = torch.cat([table.new_zeros(1, c.dim), table])
        return table

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) tokens with position embedding."""
        x = self.to_patch_embedding(img)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.pool(self.transformer(self.embed(img))))

    def forward_with_attn(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the attention weights of every block, each (B, heads, N, N)."""
        x, maps = self.transformer.forward_with_attn(self.embed(img))
        return self.mlp_head(self.pool(x)), maps


def _variant_config(
    variant: str,
    *,
    image_size,
    patch_size,
    num_classes,
    dim,
    depth,
    heads,
    mlp_dim,
    pool="cls",
    channels=3,
    dim_head=64,
    dropout=0.0,
    emb_dropout=0.0,
    pos_emb="learn",
    **extra,
) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise TypeError(f"unexpected keyword(s) {unknown}; allowed: {sorted(fields - {'name'})}")
    norms = {**VARIANT_NORMS[variant], **{k: v for k, v in extra.items() if k in VARIANT_NORMS[variant]}}
    rest = {k: v for k, v in extra.items() if k not in norms}
    return ModelConfig(
        **{"name": variant, **rest},
        image_size=image_size,
        patch_size=patch_size,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        pool=pool,
        channels=channels,
        dim_head=dim_head,
        dropout=dropout,
        emb_dropout=emb_dropout,
        pos_emb=pos_emb,
        **norms,
    )


class _Variant(VisionTransformer):
    """A VisionTransformer built from vit-pytorch's constructor keywords (plus ``pos_emb`` and any other
    ``ModelConfig`` field) with the norm placement of ``variant``."""

    variant = "vit"

    def __init__(self, **kwargs) -> None:
        super().__init__(_variant_config(self.variant, **kwargs))


class ViT(_Variant):
    """The standard pre-LayerNorm ViT (vit-pytorch's ``ViT``)."""

    variant = "vit"


class ViTBNFFN(_Variant):
    """ViT whose feed-forward blocks are Linear -> BatchNorm -> GELU -> Dropout -> Linear, with no norm in front;
    attention keeps its LayerNorm."""

    variant = "vitbnffn"


class ViTBN(_Variant):
    """ViT with token BatchNorm in place of every LayerNorm, and the feed-forward block of ViTBNFFN."""

    variant = "vitbn"
