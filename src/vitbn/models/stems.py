"""Stems other than the linear patch embedding: the hierarchical MLP stem of Touvron et al. (2022) and a small
convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better").

Both map (B, C, H, W) images to (B, h*w, D) tokens in the row-major patch order of ``PatchEmbed``. Their norms
act on (B, C, h, w) feature maps: ``nn.BatchNorm2d`` when the model's ``embed_norm`` is ``"batch"`` (per
channel; ghost and scalar statistics are options of the token norms only), a LayerNorm over the channels of
each position when it is ``"layer"``, the token norm over the channels of each position for the other kinds
(``rms``, ``dyt``, ``repbn``, ``prepbn``: ``ChannelsLast``), nothing for ``"none"``.
"""

from __future__ import annotations

import torch
from torch import nn

from vitbn.config import ModelConfig, hmlp_factors, pair
from vitbn.models.norms import ChannelsLast, make_norm, norm_options


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every position of a (B, C, H, W) map: each position (so each patch)
    is normalized on its own, unlike ``GroupNorm(1, C)``, which pools the whole map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_norm(config: ModelConfig, channels: int) -> nn.Module:
    """The norm of a stem stage (see the module docstring)."""
    kind = config.embed_norm
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=config.bn_momentum)
    if kind == "layer":
        return ChannelLayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    return ChannelsLast(make_norm(kind, channels, **norm_options(config)))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major like PatchEmbed


class HMLPStem(nn.Module):
    """Hierarchical MLP stem: a ``p x p`` patch is embedded in stages of kernel = stride convolutions (linear maps
    of non-overlapping sub-patches), e.g. 4x4 then 2x2 then 2x2 for p = 16, each followed by a norm and a GELU,
    the last by its norm only (the paper's code). Widths D/4 for every stage but the last, D for the last.
    Because no kernel straddles a patch boundary, every patch is processed independently of the others (as by
    the linear stem, and unlike a conv stem); with BatchNorm this holds in eval mode, where it is a fixed
    affine map (in training its batch statistics couple all the patches of the batch, as everywhere in a BN
    model).

    FLOPs per image: ``sum_s 2 * positions_s * k_s^2 * C_in,s * C_out,s`` (``flops``), under 1% of the study ViT's
    at patch 4.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        (ih, iw), (p, _) = pair(config.image_size), pair(config.patch_size)
        self.patch_size, self.grid = (p, p), (ih // p, iw // p)
        self.factors = hmlp_factors(p)
        widths = [max(config.dim // 4, 1)] * (len(self.factors) - 1) + [config.dim]
        layers: list[nn.Module] = []
        channels = config.channels
        for i, (k, width) in enumerate(zip(self.factors, widths)):
            layers += [
                nn.Conv2d(channels, width, kernel_size=k, stride=k),
                channel_norm(config, width),
            ]
            if i < len(self.factors) - 1:
                layers.append(nn.GELU())
            channels = width
        self.proj = nn.Sequential(*layers)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return _tokens(self.proj(img))

    def flops(self) -> int:
        """Analytic FLOPs per image (2 per multiply-add) of the stem's convolutions."""
        h, w = self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1]
        total = 0
        for conv in (m for m in self.proj if isinstance(m, nn.Conv2d)):
            k = conv.kernel_size[0]
            h, w = h // k, w // k
            total += 2 * h * w * k * k * conv.in_channels * conv.out_channels
        return total


class ConvStem(nn.Module):
    """Convolutional stem for comparison: 3x3 stride-2 convolutions (each + norm + ReLU), one per factor 2 of
    the patch size, widths doubling up to D/2, then a kernel = stride convolution for what is left of the patch
    (1x1 if nothing) to D. Its 3x3 kernels overlap patch boundaries: tokens mix neighbouring patches, which the
    linear and hMLP stems do not."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        (ih, iw), (p, _) = pair(config.image_size), pair(config.patch_size)
        self.patch_size, self.grid = (p, p), (ih // p, iw // p)
        halvings, rest = 0, p
        while rest % 2 == 0:
            halvings, rest = halvings + 1, rest // 2
        widths = [max(config.dim // 2 ** (halvings - i), 1) for i in range(halvings)]
        layers: list[nn.Module] = []
        channels = config.channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=config.embed_norm != "batch"),
                channel_norm(config, width),
                nn.ReLU(),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, config.dim, kernel_size=rest, stride=rest))
        self.proj = nn.Sequential(*layers)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return _tokens(self.proj(img))
