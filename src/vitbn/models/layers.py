"""The parts of a ViT: patch embedding, position tables, attention and the feed-forward block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.models.norms import make_norm


def dropout_or_identity(p: float) -> nn.Module:
    # A p=0 Dropout still dispatches a kernel per call in training; Identity costs nothing.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Image -> patch tokens: norm over patch pixels -> Linear -> norm over tokens (vit-pytorch's layout).

    Pixels are ordered ``(p1 p2 c)`` within a patch and patches row-major, as in vit-pytorch's
    ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``, so its weights load unchanged.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        patch_size: tuple[int, int],
        channels: int,
        dim: int,
        norm: str,
        **bn_options,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.norm_in = make_norm(norm, patch_dim, **bn_options)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = make_norm(norm, dim, **bn_options)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = img.shape
        (h, w), (p1, p2) = self.grid, self.patch_size
        # (B, C, h*p1, w*p2) -> (B, h, w, p1, p2, C) -> (B, h*w, p1*p2*C)
        x = img.reshape(b, c, h, p1, w, p2).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, h * w, p1 * p2 * c)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj(self.norm_in(self.patchify(img))))


def sincos_1d(num_positions: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The Transformer's 1-D table, (num_positions, dim): sin on even features, cos on odd ones."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(temperature) / dim))
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * omega)
    table[:, 1::2] = torch.cos(position * omega)
    return table.float()


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The 2-D table of vit-pytorch's SimpleViT, (h*w, dim): [sin x, cos x, sin y, cos y]."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a fused qkv projection (vit-pytorch's names).

    Two numerically equal paths: ``"sdpa"`` (``F.scaled_dot_product_attention``) and ``"explicit"``
    (matmul -> softmax -> matmul, which can also return the attention weights). ``"auto"`` takes the one
    measured faster on the device: explicit on CPU (for ~17 tokens the fused CPU kernel is 2-4x slower,
    see ``vitbn bench``), sdpa elsewhere.
    """

    def __init__(
        self, *, dim: int, heads: int, dim_head: int, dropout: float, norm: str, impl: str = "auto", **bn_options
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.impl = heads, dim_head, impl
        self.scale = dim_head**-0.5
        self.attn_dropout = dropout
        self.norm = make_norm(norm, dim, **bn_options)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.attn_drop = dropout_or_identity(dropout)
        project_out = not (heads == 1 and dim_head == dim)  # vit-pytorch skips it in this case
        self.to_out = nn.Linear(inner, dim) if project_out else nn.Identity()
        self.out_drop = dropout_or_identity(dropout) if project_out else nn.Identity()

    def use_explicit(self, x: torch.Tensor) -> bool:
        return self.impl == "explicit" or (self.impl == "auto" and x.device.type == "cpu")

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        b, n, _ = x.shape
        qkv = self.to_qkv(self.norm(x))
        # (B, N, 3*H*Dh) -> 3 x (B, H, N, Dh)
        q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        attn = None
        if return_attn or self.use_explicit(x):
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, H, N, N)
            out = self.attn_drop(attn) @ v
        else:
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = self.out_drop(self.to_out(out.transpose(1, 2).reshape(b, n, -1)))  # (B, N, H*Dh) -> (B, N, D)
        return (out, attn) if return_attn else out


class FeedForward(nn.Module):
    """Pre-norm MLP: norm -> fc1 -> inner norm -> GELU -> Dropout -> fc2 -> Dropout.

    The ViT has a LayerNorm in front and none inside; the BN variants have none in front and a BatchNorm
    between fc1 and GELU.
    """

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float, norm: str, inner_norm: str, **bn_options) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, **bn_options)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.inner_norm = make_norm(inner_norm, hidden_dim, **bn_options)
        self.act = nn.GELU()
        self.drop1 = dropout_or_identity(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = dropout_or_identity(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inner_norm(self.fc1(self.norm(x))))
        return self.drop2(self.fc2(self.drop1(x)))
