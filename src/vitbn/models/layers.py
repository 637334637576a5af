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


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a fused qkv projection (vit-pytorch's names).

    Two numerically equal paths: ``"sdpa"`` (``F.scaled_dot_product_attention``) and ``"explicit"``
    (matmul -> softmax -> matmul, which can also return the attention weights). ``"auto"`` takes the one
    measured faster on the device (see ``use_explicit``).
    """

    def __init__(
        self, *, dim: int, heads: int, dim_head: int, dropout: float, norm: str, impl: str = "auto", **norm_options
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.impl = heads, dim_head, impl
        self.scale = dim_head**-0.5
        self.attn_dropout = dropout
        self.norm = make_norm(norm, dim, **norm_options)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.attn_drop = dropout_or_identity(dropout)
        project_out = not (heads == 1 and dim_head == dim)  # vit-pytorch skips it in this case
        self.to_out = nn.Linear(inner, dim) if project_out else nn.Identity()
        self.out_drop = dropout_or_identity(dropout) if project_out else nn.Identity()

    def use_explicit(self, qkv: torch.Tensor) -> bool:
        """Whether the explicit path computes attention on ``qkv`` (see the function ``use_explicit``)."""
        return use_explicit(self.impl, qkv)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        qkv = self.to_qkv(self.norm(x))  # (B, N, 3*H*Dh), features ordered (3, H, Dh)
        out, attn = attend(
            qkv.unsqueeze(0), self.heads, self.dim_head, self.scale, self.attn_drop,
            explicit=return_attn or self.use_explicit(qkv), dropout_p=self.attn_dropout if self.training else 0.0,
        )  # fmt: skip
        out = self.out_drop(self.to_out(out))  # (B, N, H*Dh) -> (B, N, D)
        return (out, attn) if return_attn else out


def use_explicit(impl: str, qkv: torch.Tensor) -> bool:
    """Whether the explicit path computes attention on the projection ``qkv``. ``"auto"``: the fused kernel
    (``F.scaled_dot_product_attention``), except for half-precision training on the CPU. Measured side by side by
    ``benchmarks/attention_impl.py`` for the study's ViT and ViTBN (17 tokens, 8 heads of 64), fp32, on 2 cores of
    an AVX2 EPYC: the fused kernel trains 1.4-1.6x and infers 1.1x as fast as the explicit path (docs/bench), whose
    per-head strided products copy their operands there; in bf16 training on an AVX512-BF16 CPU it took ~3x the
    explicit path's time. (``forward_flops`` counts the explicit path: ``torch.utils.flop_counter`` does not see
    the CPU flash kernel.)"""
    if impl != "auto":
        return impl == "explicit"
    return qkv.device.type == "cpu" and qkv.dtype in _HALF and torch.is_grad_enabled()


def attend(
    qkv: torch.Tensor, heads: int, dim_head: int, scale: float, drop: nn.Module, *, explicit: bool, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of K branches at once on their projections ``qkv`` (K, B, N, 3*H*Dh), each branch's
    features ordered (3, H, Dh); K = 1 for a sequential block. The K*H heads run as one batch of heads.

    Returns:
        The (B, N, K*H*Dh) output, features ordered (K, H, Dh) (what one wide output projection takes), and the
        (B, K*H, N, N) attention weights of the explicit path (None from the fused kernel).
    """
    k, b, n, _ = qkv.shape
    # (K, B, N, 3*H*Dh) -> 3 x (B, K, H, N, Dh) strided views
    q, key, v = qkv.view(k, b, n, 3, heads, dim_head).permute(3, 1, 0, 4, 2, 5).unbind(0)
    if not explicit:  # K = 1: flatten is a view, as are the strided operands the kernel reads in place
        out = F.scaled_dot_product_attention(q.flatten(1, 2), key.flatten(1, 2), v.flatten(1, 2), dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(b, n, -1), None
    # Parallel branches (K > 1) run all K*H heads as one batched product: one at a time they would be K times the
    # small kernels of a sequential block, the op overhead that the parallel layout is meant to cut.
    if k > 1 or torch.compiler.is_compiling() or (qkv.dtype in _HALF and torch.is_grad_enabled()):
        return _batched(q, key, v, scale, drop)
    return _per_head(q, key, v, scale, drop)


def _per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, drop: nn.Module):
    """One head at a time: a (B, N, Dh) head of the (B, N, 3*H*Dh) projection is a valid ``bmm`` operand as it
    stands, whereas the (B, H, N, Dh) head layout is not a batch of matrices without copying q, k, v, the output
    and all their gradients. With glibc's default allocator, whose freed large blocks are page-faulted back in,
    that measured ~5700 fewer page faults per fp32 training step of the study's ViT (batch 100), and ~1.3x (fp32)
    and ~1.5x (bf16) the inference throughput at batch 1000; with the allocator tuned
    (``vitbn.bench.tune_cpu_allocator``) the layouts measured within noise of each other in fp32."""
    heads = [(i, j) for i in range(q.shape[1]) for j in range(q.shape[2])]  # (branch, head)
    dots = torch.stack([torch.bmm(q[:, i, j], k[:, i, j].transpose(1, 2)) for i, j in heads], dim=1)
    attn = _softmax(dots * scale)  # (B, K*H, N, N)
    weights = drop(attn)
    out = torch.cat([torch.bmm(weights[:, h], v[:, i, j]) for h, (i, j) in enumerate(heads)], dim=-1)
    return out, attn  # (B, N, K*H*Dh)


def _batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, drop: nn.Module):
    """q, k, v copied to (B*K*H, N, Dh) each, then batched products over all heads: in bf16 the small strided
    products of ``_per_head`` are copied to dense operands one by one (three times as many copies). One
    copy of each of q, k, v (the reference's graph) rather than one (3, B*H, N, Dh) copy: compiled on 2
    threads, the latter trained ~10% slower than the reference (two noisy runs), this form on par. Under
    ``torch.compile`` this is the path taken: the textbook graph, whose copies the compiler fuses."""
    b, branches, h, n, dh = q.shape
    q, k, v = (t.reshape(b * branches * h, n, dh) for t in (q, k, v))
    attn = _softmax(torch.bmm(q, k.transpose(1, 2)) * scale)  # (B*K*H, N, N)
    out = torch.bmm(drop(attn), v)  # (B*K*H, N, Dh)
    out = out.view(b, branches * h, n, dh).transpose(1, 2).reshape(b, n, branches * h * dh)
    return out, attn.view(b, branches * h, n, n)


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
