"""Ghost BatchNorm: training-time statistics over sub-batches of a fixed normalization batch size (NBS).

The mechanism lives in ``TokenBatchNorm`` (``ghost_batch_size``): in training each sub-batch of NBS images is
normalized with its own statistics, and the running statistics move by the mean of the sub-batch statistics.
This module switches it on and off for a whole model.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from vitbn.models.norms import TokenBatchNorm


def set_ghost_batch_size(model: nn.Module, size: int | None) -> int:
    """Sets the ghost batch size of every ``TokenBatchNorm`` of ``model`` (None: plain BatchNorm).

    The model's ``config.ghost_batch_size`` follows, so that an exported model records it.

    Args:
        model: a model holding TokenBatchNorm layers (possibly DDP-wrapped).
        size: images per normalization sub-batch, or None.

    Returns:
        How many TokenBatchNorm layers were set.
    """
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ValueError(f"ghost batch size={size!r} must be a positive integer or None")
    count = 0
    for module in model.modules():
        if isinstance(module, TokenBatchNorm):
            module.ghost_batch_size = size
            count += 1
    target = getattr(model, "module", model)  # DDP keeps the model at .module
    config = getattr(target, "config", None)
    if dataclasses.is_dataclass(config) and hasattr(config, "ghost_batch_size"):
        target.config = dataclasses.replace(config, ghost_batch_size=size)  # configs may be shared: a new one
    return count
