"""Pre-norm residual blocks, sequential and parallel (Touvron et al. 2022), with LayerScale and stochastic
depth, and the stack of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitbn.config import ModelConfig
from vitbn.models.attention import AttentionCore
from vitbn.models.layers import Attention, BranchLinear, FeedForward, dropout_or_identity
from vitbn.models.norms import make_norm, norm_options


def drop_path_rates(config: ModelConfig) -> list[float]:
    """Stochastic depth rate of every stage: 0 at the first, rising linearly to ``drop_path`` at the last."""
    depth = config.depth
    return [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]


def keep_mask(shape: tuple[int, ...], rate: float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample stochastic depth: 0 with probability ``rate``, else ``1 / (1 - rate)`` (the expectation is 1)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1.0 - rate) / (1.0 - rate)


class LayerScale(nn.Module):
    """A learnable per-channel scale of a residual branch (CaiT), initialized to ``init``; ``branches``: one
    scale per branch of a parallel block, shape (K, D)."""

    def __init__(self, dim: int, init: float, branches: int | None = None) -> None:
        super().__init__()
        shape = (dim,) if branches is None else (branches, dim)
        self.gamma = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, a whole residual branch of a sample is dropped with probability ``rate``
    and kept ones are scaled by ``1 / (1 - rate)``; the identity in eval mode."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return x * keep_mask((x.shape[0],) + (1,) * (x.ndim - 1), self.rate, x)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3g}"


def _scale_or_identity(config: ModelConfig) -> nn.Module:
    return LayerScale(config.dim, config.layer_scale) if config.layer_scale is not None else nn.Identity()


class Block(nn.Module):
    """``x = x + drop(ls(attn(x))); x = x + drop(ls(ff(x)))``; each sub-block carries its own pre-norm."""

    def __init__(self, config: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        opts = norm_options(config)
        self.attn = Attention(
            dim=config.dim, heads=config.heads, dim_head=config.dim_head, dropout=config.dropout,
            norm=config.attn_norm, impl=config.attn_impl, **opts,
        )  # fmt: skip
        self.ff = FeedForward(
            dim=config.dim, hidden_dim=config.mlp_dim, dropout=config.dropout, norm=config.ffn_norm,
            inner_norm=config.ffn_inner_norm, **opts,
        )  # fmt: skip
        self.attn_scale, self.ff_scale = _scale_or_identity(config), _scale_or_identity(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn_scale(self.attn(x)))
        return x + self.drop_path(self.ff_scale(self.ff(x)))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = self.attn(x, return_attn=True)
        x = x + self.drop_path(self.attn_scale(out))
        return x + self.drop_path(self.ff_scale(self.ff(x))), attn


def _branch_inputs(norms: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (K, B*N, D): every branch's pre-norm of ``x`` (no copies when there is no norm)."""
    b, n, d = x.shape
    if all(isinstance(norm, nn.Identity) for norm in norms):
        return x.reshape(1, b * n, d).expand(len(norms), b * n, d)
    return torch.stack([norm(x) for norm in norms]).view(len(norms), b * n, d)


class ParallelAttention(AttentionCore):
    """The K attention branches of a parallel stage, ``sum_k MHSA_k(norm_k(x))``, as wide operations: one
    batched qkv product for all branches, the K*H heads as one batch of heads, and one output product over the
    concatenated branch outputs (the sum over branches is inside that matrix product). Parameters per branch
    are those of a sequential ``Attention`` (``to_qkv.weight[k]``, ``to_out.weight[k]``, ``to_out.bias[k]``).
    LayerScale and stochastic depth act per branch, folded into the output product; dropout acts on the sum.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(heads=config.heads, dim_head=config.dim_head, dropout=config.dropout, impl=config.attn_impl,
                         drop=dropout_or_identity(config.dropout))  # fmt: skip
        k, inner = config.parallel, config.heads * config.dim_head
        self.norms = nn.ModuleList(make_norm(config.attn_norm, config.dim, **norm_options(config)) for _ in range(k))
        self.to_qkv = BranchLinear(k, config.dim, 3 * inner, bias=False)
        self.to_out = BranchLinear(k, inner, config.dim)
        self.out_drop = dropout_or_identity(config.dropout)
        self.layer_scale = LayerScale(config.dim, config.layer_scale, k) if config.layer_scale is not None else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, return_attn: bool = False):
        """``keep``: a (B, K) stochastic-depth mask (see ``keep_mask``) or None."""
        b, n, d = x.shape
        branches = self.to_qkv.branches
        qkv = self.to_qkv(_branch_inputs(self.norms, x)).view(branches, b, n, -1)  # (K, B, N, 3*H*Dh [+ H])
        out, attn = self.attend(qkv, return_attn)
        weight, bias = self.to_out.weight, self.to_out.bias  # (K, D, H*Dh), (K, D)
        if self.layer_scale is not None:
            gamma = self.layer_scale.gamma  # (K, D): scales branch k's rows
            weight, bias = weight * gamma[:, :, None], bias * gamma
        weight = weight.transpose(0, 1).reshape(d, -1)  # (D, K*H*Dh), columns ordered (K, H, Dh) like ``out``
        if keep is None:
            y = F.linear(out, weight, bias.sum(0))
        else:  # sum_k keep_k (W_k o_k + b_k) = W (keep * o) + keep @ b
            out = (out.view(b, n, branches, -1) * keep[:, None, :, None]).view(b, n, -1)
            y = F.linear(out, weight) + (keep @ bias)[:, None, :]
        y = self.out_drop(y)
        return (y, attn) if return_attn else y


class ParallelFeedForward(nn.Module):
    """The K feed-forward branches of a parallel stage, ``sum_k FFN_k(norm_k(x))``: one batched product per
    layer for all branches (``fc1``, ``fc2``: ``BranchLinear``), per-branch inner norms, then the sum."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        k, opts = config.parallel, norm_options(config)
        self.norms = nn.ModuleList(make_norm(config.ffn_norm, config.dim, **opts) for _ in range(k))
        self.fc1 = BranchLinear(k, config.dim, config.mlp_dim)
        self.inner_norms = nn.ModuleList(make_norm(config.ffn_inner_norm, config.mlp_dim, **opts) for _ in range(k))
        self.act = nn.GELU()
        self.drop1 = dropout_or_identity(config.dropout)
        self.fc2 = BranchLinear(k, config.mlp_dim, config.dim)
        self.drop2 = dropout_or_identity(config.dropout)
        self.layer_scale = LayerScale(config.dim, config.layer_scale, k) if config.layer_scale is not None else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.fc1(_branch_inputs(self.norms, x))  # (K, B*N, hidden)
        if not all(isinstance(norm, nn.Identity) for norm in self.inner_norms):
            h = torch.stack([norm(h[i]) for i, norm in enumerate(self.inner_norms)])
        y = self.fc2(self.drop1(self.act(h)))  # (K, B*N, D)
        if self.layer_scale is not None:
            y = y * self.layer_scale.gamma[:, None, :]
        if keep is not None:
            y = (y.view(-1, b, n, d) * keep.t()[:, :, None, None]).view(-1, b * n, d)
        return self.drop2(y.sum(0).view(b, n, d))


class ParallelBlock(nn.Module):
    """A stage of K parallel blocks: ``x = x + sum_k MHSA_k(x); x = x + sum_k FFN_k(x)``. It holds the
    parameters and FLOPs of K sequential blocks in half as many residual steps (for K = 2), so a depth-2k
    ViT becomes k such stages."""

    def __init__(self, config: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attn = ParallelAttention(config)
        self.ff = ParallelFeedForward(config)
        self.drop_rate = drop_path

    def _keep(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.drop_rate == 0.0:
            return None
        return keep_mask((x.shape[0], self.attn.to_qkv.branches), self.drop_rate, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, self._keep(x))
        return x + self.ff(x, self._keep(x))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = self.attn(x, self._keep(x), return_attn=True)
        x = x + out
        return x + self.ff(x, self._keep(x)), attn


class Transformer(nn.Module):
    """``depth`` stages (sequential blocks, or parallel ones when ``parallel`` > 1), every one of them run,
    then the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        block = Block if config.parallel == 1 else ParallelBlock
        self.layers = nn.ModuleList(block(config, rate) for rate in drop_path_rates(config))
        self.norm = make_norm(config.final_norm, config.dim, **norm_options(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.norm(x)

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output and every stage's attention weights, (B, K*H, N, N) (branch-major heads)."""
        maps = []
        for block in self.layers:
            x, attn = block.forward_with_attn(x)
            maps.append(attn)
        return self.norm(x), maps
