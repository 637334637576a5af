"""The parts of a ViT: patch embedding, position tables, attention and the feed-forward block."""

from __future__ import annotations

import math

import torch
from torch import nn

from vitbn.models.attention import AttentionCore
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
        **norm_options,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        patch_dim = channels * patch_size[0] * patch_size[1]
        self.norm_in = make_norm(norm, patch_dim, **norm_options)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = make_norm(norm, dim, **norm_options)

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


class Attention(AttentionCore):
    """Pre-norm multi-head self-attention with a fused qkv projection (vit-pytorch's names); the attention itself
    runs by the path ``impl`` names: ``"fused"``, ``"plain"`` or ``"auto"`` (see ``vitbn.models.attention``)."""

    def __init__(
        self, *, dim: int, heads: int, dim_head: int, dropout: float, norm: str, impl: str = "auto", **norm_options
    ) -> None:
        super().__init__(heads=heads, dim_head=dim_head, dropout=dropout, impl=impl, drop=dropout_or_identity(dropout))
        inner = heads * dim_head
        self.norm = make_norm(norm, dim, **norm_options)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        project_out = not (heads == 1 and dim_head == dim)  # vit-pytorch skips it in this case
        self.to_out = nn.Linear(inner, dim) if project_out else nn.Identity()
        self.out_drop = dropout_or_identity(dropout) if project_out else nn.Identity()

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        qkv = self.to_qkv(self.norm(x))  # (B, N, 3*H*Dh [+ H folded key terms]), features ordered (3, H, Dh)
        out, attn = self.attend(qkv.unsqueeze(0), return_attn)
        out = self.out_drop(self.to_out(out))  # (B, N, H*Dh) -> (B, N, D)
        return (out, attn) if return_attn else out


class FeedForward(nn.Module):
    """Pre-norm MLP: norm -> fc1 -> inner norm -> GELU -> Dropout -> fc2 -> Dropout.

    The ViT has a LayerNorm in front and none inside; the BN variants have none in front and a BatchNorm
    between fc1 and GELU.
    """

    def __init__(
        self, *, dim: int, hidden_dim: int, dropout: float, norm: str, inner_norm: str, **norm_options
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, dim, **norm_options)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.inner_norm = make_norm(inner_norm, hidden_dim, **norm_options)
        self.act = nn.GELU()
        self.drop1 = dropout_or_identity(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = dropout_or_identity(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.inner_norm(self.fc1(self.norm(x))))
        return self.drop2(self.fc2(self.drop1(x)))


class BranchLinear(nn.Module):
    """K independent Linear maps applied at once, (K, M, in) -> (K, M, out), as one batched matrix product:
    the branches of a parallel block are one kernel, not K. Each branch is initialized as ``nn.Linear``.

    Args:
        branches: K.
        in_features: input width.
        out_features: output width.
        bias: whether each branch has a bias.
    """

    def __init__(self, branches: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.branches, self.in_features, self.out_features = branches, in_features, out_features
        bound = in_features**-0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) and bias bound
        self.weight = nn.Parameter(torch.empty(branches, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(branches, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"branches={self.branches}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
