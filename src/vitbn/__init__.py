"""vitbn: train, time, track, tune and compare Vision Transformers with LayerNorm and BatchNorm."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["ViT", "ViTBN", "ViTBNFFN", "VisionTransformer", "create_model", "list_models", "__version__"]


def __getattr__(name: str):
    """The model names, imported on first use: ``import vitbn`` (and so the ``vitbn`` command's start, where Ctrl-C
    must be answered in one line) does not import PyTorch."""
    if name in __all__:
        import vitbn.models

        return getattr(vitbn.models, name)
    raise AttributeError(f"module 'vitbn' has no attribute {name!r}")
