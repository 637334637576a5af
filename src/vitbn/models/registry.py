"""Named presets -> ModelConfig; ``create_model(name, **overrides)``; FLOP and parameter counts."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitbn.config import MODEL_PRESETS, ModelConfig
from vitbn.models.vit import VisionTransformer


def register_model(name: str, **config) -> None:
    """Adds a preset: ``create_model(name)`` builds ``VisionTransformer(ModelConfig(**config))``."""
    if name in MODEL_PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    if "+" in name:
        raise ValueError(f"model name {name!r} must not contain '+' (it separates a preset from its overrides)")
    ModelConfig(**config)  # a bad preset fails here, with the field named
    MODEL_PRESETS[name] = dict(config)


def list_models() -> list[str]:
    """The registered preset names."""
    return sorted(MODEL_PRESETS)


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with fields overridden (``ModelConfig.from_preset``)."""
    return ModelConfig.from_preset(name, **overrides)


def build_model(config: ModelConfig) -> VisionTransformer:
    """The model a config describes: the one way every model of vitbn is built."""
    return VisionTransformer(config)


def create_model(name: str, **overrides) -> VisionTransformer:
    """A preset model, e.g. ``create_model("vitbn", depth=1)``: preset defaults + overrides -> config -> model."""
    return build_model(ModelConfig.from_preset(name, **overrides))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: VisionTransformer, batch: int = 1, train: bool = False) -> int:
    """FLOPs per image of one forward pass (or of forward + backward when ``train``), counted by
    ``torch.utils.flop_counter`` (matrix products; 2 FLOPs per multiply-add)."""
    c = model.config
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    model = copy.deepcopy(model).train(train)  # BN running stats and grads of the caller's model stay untouched
    for module in model.modules():  # the counter sees the plain path's products, not every fused kernel
        if getattr(module, "impl", None) in ("auto", "fused"):
            module.impl = "plain"
    x = torch.randn(batch, c.channels, h, w, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() // batch
