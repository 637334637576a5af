"""vitbn: train, time, track, tune and compare Vision Transformers with LayerNorm and BatchNorm."""

from vitbn.models import VisionTransformer, ViT, ViTBN, ViTBNFFN, create_model, list_models

__version__ = "0.1.0"

__all__ = ["ViT", "ViTBN", "ViTBNFFN", "VisionTransformer", "create_model", "list_models", "__version__"]
