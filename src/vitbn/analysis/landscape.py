"""A 1-D slice of the loss landscape along a filter-normalized random direction (Li et al. 2018, "Visualizing
the Loss Landscape of Neural Nets").

The direction ``d`` is seeded Gaussian, and each row of each weight matrix (a filter: an output unit of a Linear
map or of a branch of a parallel one, an output channel of a convolution) is rescaled to the norm of the same
row of the weight, so that a step ``alpha`` moves every filter by ``alpha`` times its own size: scale-invariant
filters (followed by a norm) are compared fairly across models. The embeddings (``cls_token`` and a learned
``pos_embedding``) are normalized per row (per token) the same way. Every other parameter -- biases, the
scales and shifts of norms, LayerScale, DyT's alpha -- gets direction 0 (the paper's "ignore biasbn"): they are
few, and moving them by their own size would dominate the slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitbn.analysis.common import Batches, analysis_mode, mean_loss
from vitbn.models.layers import BranchLinear


@dataclass(frozen=True)
class LandscapeSlice:
    """The loss and accuracy at ``w + alpha d`` for each ``alpha``."""

    alphas: list[float]
    loss: list[float]
    acc: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(p: torch.Tensor, layout: str) -> torch.Tensor:
    """The filters of a weight as rows: (out, in, kh, kw) -> (out, in*kh*kw) for a convolution (``"conv"``), else
    the last axis is the input (``"rows"``): (out, in), (K, out, in) -> (K*out, in), (N, D) -> (N, D)."""
    return p.reshape(p.shape[0], -1) if layout == "conv" else p.reshape(-1, p.shape[-1])


def directed_parameters(model: nn.Module) -> dict[str, str | None]:
    """Parameter name -> how the slice's direction moves it, for every parameter of ``model``: ``"rows"`` (the
    weights of Linear and BranchLinear maps, the embeddings: one filter per row of the last axis), ``"conv"``
    (the weights of a Conv2d: one filter per output channel) or None (held: direction 0)."""
    layout: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, BranchLinear, nn.Conv2d)):
            layout[id(module.weight)] = "conv" if isinstance(module, nn.Conv2d) else "rows"
    for p in (getattr(model, "cls_token", None), getattr(model, "pos_embedding", None)):
        if isinstance(p, nn.Parameter):
            layout[id(p)] = "rows"
    return {name: layout.get(id(p)) for name, p in model.named_parameters()}


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The direction of the slice, one tensor per named parameter (see the module docstring): Gaussian from a
    generator seeded by ``seed`` (drawn in float64 on the CPU in parameter order, so the same on every device),
    each row rescaled to the norm of the weight's row; zeros for the parameters it holds."""
    generator = torch.Generator().manual_seed(seed)
    kinds = directed_parameters(model)
    direction = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            layout = kinds[name]
            if layout is None:
                direction[name] = torch.zeros_like(p)
                continue
            d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            w, rows = _rows(p.detach().double().cpu(), layout), _rows(d, layout)
            rows.mul_(w.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True))
            direction[name] = d.to(device=p.device, dtype=p.dtype)
    return direction


def loss_slice(
    model: nn.Module,
    batches: Batches,
    *,
    points: int = 21,
    span: float = 1.0,
    seed: int = 0,
    bn_mode: str = "eval",
    direction: dict[str, torch.Tensor] | None = None,
) -> LandscapeSlice:
    """The mean cross-entropy and accuracy over ``batches`` at ``w + alpha d`` for ``points`` values of alpha
    evenly spaced on ``[-span, span]``, ``d`` the filter-normalized direction (``filter_normalized_direction``
    with ``seed``, unless ``direction`` is given). The model is in eval mode (``bn_mode="train"``: its BatchNorms
    on batch statistics, running statistics kept); its weights and mode are restored exactly afterwards.
    """
    if not (isinstance(points, int) and points >= 2):
        raise ValueError(f"points={points!r} must be an integer >= 2")
    if not span > 0:
        raise ValueError(f"span={span!r} must be > 0")
    direction = direction if direction is not None else filter_normalized_direction(model, seed)
    alphas = torch.linspace(-span, span, points, dtype=torch.float64).tolist()
    if points % 2:
        alphas[points // 2] = 0.0  # exactly the trained weights in the middle
    params = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    losses, accs = [], []
    try:
        with analysis_mode(model, bn_mode):
            for alpha in alphas:
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(torch.add(saved[name], direction[name], alpha=alpha))
                loss, acc = mean_loss(model, batches)
                losses.append(loss)
                accs.append(acc)
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    return LandscapeSlice(alphas, losses, accs)
