"""The ViT family: one configurable VisionTransformer, its norms, presets and converters."""

from vitbn.models.norms import TokenBatchNorm, make_norm
from vitbn.models.registry import (
    build_model,
    count_params,
    create_model,
    forward_flops,
    list_models,
    preset_config,
    register_model,
)
from vitbn.models.vit import VisionTransformer, ViT, ViTBN, ViTBNFFN

__all__ = [
    "TokenBatchNorm",
    "VisionTransformer",
    "ViT",
    "ViTBN",
    "ViTBNFFN",
    "build_model",
    "count_params",
    "create_model",
    "forward_flops",
    "list_models",
    "make_norm",
    "preset_config",
    "register_model",
]
