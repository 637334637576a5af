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
    measured faster on the device (see ``use_explicit``).
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

    def use_explicit(self, qkv: torch.Tensor) -> bool:
        """Whether the explicit path computes attention on the projection ``qkv``. ``"auto"``: explicit on the
        CPU, the fused kernel elsewhere. For the 17 tokens of the study's ViT on 2 CPU cores the fused kernel took
        ~3x the time of the explicit path in bf16 training and was within noise in fp32 training. (In fp32
        inference it measured ~1.1-1.4x faster, but ``torch.utils.flop_counter`` does not count the CPU flash
        kernel, so ``forward_flops`` would lose the attention FLOPs.)"""
        if self.impl != "auto":
            return self.impl == "explicit"
        return qkv.device.type == "cpu"

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        qkv = self.to_qkv(self.norm(x))  # (B, N, 3*H*Dh), features ordered (3, H, Dh)
        attn = None
        if return_attn or self.use_explicit(qkv):
            out, attn = self._explicit(qkv)
        else:
            b, n, _ = x.shape
            # (B, N, 3*H*Dh) -> 3 x (B, H, N, Dh) strided views; the kernel reads them in place
            q, k, v = qkv.view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(b, n, -1)
        out = self.out_drop(self.to_out(out))  # (B, N, H*Dh) -> (B, N, D)
        return (out, attn) if return_attn else out

    def _explicit(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """matmul -> softmax -> matmul; returns the (B, N, H*Dh) output and the (B, H, N, N) weights.

        The layout is chosen per case from CPU measurements (``vitbn bench``, ``benchmarks/``): half-precision
        training takes the batched layout, everything else one head at a time on strided views. Under
        ``torch.compile`` the batched layout, the textbook graph, whose copies the compiler fuses.
        """
        if torch.compiler.is_compiling() or (qkv.dtype in _HALF and torch.is_grad_enabled()):
            return self._batched(qkv)
        return self._per_head(qkv)

    def _per_head(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (B, N, Dh) slice of the (B, N, 3*H*Dh) projection is a valid ``bmm`` operand as it stands, whereas
        the (B, H, N, Dh) head layout is not a batch of matrices without copying q, k, v, the output and all
        their gradients. With glibc's default allocator, whose freed large blocks are page-faulted back in,
        that measured ~5700 fewer page faults per fp32 training step of the study's ViT (batch 100), and ~1.3x
        (fp32) and ~1.5x (bf16) the inference throughput at batch 1000; with the allocator tuned
        (``vitbn.bench.tune_cpu_allocator``) the layouts measured within noise of each other in fp32."""
        h = self.heads
        parts = qkv.split(self.dim_head, dim=-1)  # 3*H views (B, N, Dh): q heads, k heads, v heads
        dots = torch.stack([torch.bmm(parts[i], parts[h + i].transpose(1, 2)) for i in range(h)], dim=1)
        attn = _softmax(dots * self.scale)  # (B, H, N, N)
        weights = self.attn_drop(attn)
        out = torch.cat([torch.bmm(weights[:, i], parts[2 * h + i]) for i in range(h)], dim=-1)  # (B, N, H*Dh)
        return out, attn

    def _batched(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v copied to (B*H, N, Dh) each, then batched products over all heads: in bf16 the small strided
        products of ``_per_head`` are copied to dense operands one by one (three times as many copies). One
        copy of each of q, k, v (the reference's graph) rather than one (3, B*H, N, Dh) copy: compiled on 2
        threads, the latter trained ~10% slower than the reference (two noisy runs), this form on par."""
        b, n, _ = qkv.shape
        h, dh = self.heads, self.dim_head
        q, k, v = (t.view(b, n, h, dh).transpose(1, 2).reshape(b * h, n, dh) for t in qkv.chunk(3, dim=-1))
        attn = _softmax(torch.bmm(q, k.transpose(1, 2)) * self.scale)  # (B*H, N, N)
        out = torch.bmm(self.attn_drop(attn), v)  # (B*H, N, Dh)
        out = out.view(b, h, n, dh).transpose(1, 2).reshape(b, n, h * dh)
        return out, attn.view(b, h, n, n)


_HALF = (torch.bfloat16, torch.float16)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; half-precision scores are normalized in fp32 and rounded once (as CUDA
    autocast does): in a one-thread profile, the CPU's bf16 softmax over 17 keys took ~3x (forward) and ~17x
    (backward) the time of fp32."""
    if scores.dtype in _HALF:
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    return scores.softmax(dim=-1)


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
