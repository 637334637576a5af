"""Named presets -> ModelConfig; ``create_model(name, **overrides)``; FLOP and parameter counts."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitbn.config import ModelConfig
from vitbn.models.vit import VARIANT_NORMS, VisionTransformer, ViT, ViTBN, ViTBNFFN

# The study's MNIST hyperparameters (vit-pytorch keywords), shared by the three presets.
STUDY_MNIST = dict(
    image_size=28,
    patch_size=7,
    channels=1,
    num_classes=10,
    dim=64,
    depth=6,
    heads=8,
    dim_head=64,
    mlp_dim=128,
    dropout=0.0,
    emb_dropout=0.0,
    pool="cls",
    pos_emb="learn",
)

_PRESETS: dict[str, tuple[type[VisionTransformer], dict]] = {}


def register_model(name: str, cls: type[VisionTransformer], **config) -> None:
    """Adds a preset: ``create_model(name)`` builds ``cls`` from ``ModelConfig(**config)``."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    _PRESETS[name] = (cls, config)


for _name, _cls in (("vit", ViT), ("vitbnffn", ViTBNFFN), ("vitbn", ViTBN)):
    register_model(_name, _cls, **STUDY_MNIST, **VARIANT_NORMS[_name])


def list_models() -> list[str]:
    """The registered preset names."""
    return sorted(_PRESETS)


def preset_config(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset, with fields overridden."""
    if name not in _PRESETS:
        raise ValueError(f"model={name!r} is not one of {', '.join(repr(n) for n in list_models())}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: {', '.join(sorted(fields))}")
    return ModelConfig(**{**_PRESETS[name][1], **overrides, "name": name})


def build_model(config: ModelConfig) -> VisionTransformer:
    """A model from a full config; the preset's class when ``config.name`` is a preset."""
    cls = _PRESETS[config.name][0] if config.name in _PRESETS else VisionTransformer
    model = VisionTransformer.__new__(cls)
    VisionTransformer.__init__(model, config)
    return model


def create_model(name: str, **overrides) -> VisionTransformer:
    """A preset model, e.g. ``create_model("vitbn", depth=1)``."""
    return build_model(preset_config(name, **overrides))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: VisionTransformer, batch: int = 1, train: bool = False) -> int:
    """FLOPs per image of one forward pass (or of forward + backward when ``train``), counted by
    ``torch.utils.flop_counter`` (matrix products; 2 FLOPs per multiply-add)."""
    c = model.config
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    model = copy.deepcopy(model).train(train)  # BN running stats and grads of the caller's model stay untouched
    x = torch.randn(batch, c.channels, h, w, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() // batch
