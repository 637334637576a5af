"""Pre-norm residual blocks and the stack of them."""

from __future__ import annotations

import torch
from torch import nn

from vitbn.config import ModelConfig
from vitbn.models.layers import Attention, FeedForward
from vitbn.models.norms import make_norm


def bn_options(config: ModelConfig) -> dict:
    """The TokenBatchNorm keywords a config implies."""
    return {"stats": config.bn_stats, "momentum": config.bn_momentum, "ghost_batch_size": config.ghost_batch_size}


class Block(nn.Module):
    """``x = x + attn(x); x = x + ff(x)``; each sub-block carries its own pre-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bn = bn_options(config)
        self.attn = Attention(
            dim=config.dim,
            heads=config.heads,
            dim_head=config.dim_head,
            dropout=config.dropout,
            norm=config.attn_norm,
            impl=config.attn_impl,
            **bn,
        )
        self.ff = FeedForward(
            dim=config.dim,
            hidden_dim=config.mlp_dim,
            dropout=config.dropout,
            norm=config.ffn_norm,
            inner_norm=config.ffn_inner_norm,
            **bn,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x)

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = self.attn(x, return_attn=True)
        x = x + out
        return x + self.ff(x), attn


class Transformer(nn.Module):
    """``depth`` blocks, every one of them run, then the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = make_norm(config.final_norm, config.dim, **bn_options(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return self.norm(x)

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = []
        for block in self.layers:
            x, attn = block.forward_with_attn(x)
            maps.append(attn)
        return self.norm(x), maps
