"""vitbn: train, time, track, tune and compare Vision Transformers with LayerNorm and BatchNorm.

The model classes are imported on first use, so that ``import vitbn`` (and the ``vitbn`` command's start) does not
import torch: the command sets up the CPU runtime (``vitbn.runtime.openmp_defaults``) before anything loads torch
and its OpenMP runtime, and answers a Ctrl-C during start-up in one line.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["ViT", "ViTBN", "ViTBNFFN", "VisionTransformer", "create_model", "list_models", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("vitbn.models"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitbn' has no attribute {name!r}")
