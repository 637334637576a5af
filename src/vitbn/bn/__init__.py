"""The BatchNorm toolkit: precise statistics, frozen BN, ghost BN, SyncBN on any device, folding for inference.

The consistency study (``vitbn bn-study``) is in ``vitbn.bn.study``; data-parallel training (DDP, SyncBN
conversion, averaged BN buffers) in ``vitbn.engine.distributed``.
"""

from vitbn.bn.frozen import FrozenBatchNorm, freeze_bn, kept_bn_stats, unfreeze_bn
from vitbn.bn.fuse import bn_scale_shift, fuse_bn
from vitbn.bn.ghost import set_ghost_batch_size
from vitbn.bn.precise import recompute_bn_stats
from vitbn.bn.syncbn import AllReduceSyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "AllReduceSyncBatchNorm",
    "FrozenBatchNorm",
    "bn_scale_shift",
    "convert_sync_batchnorm",
    "freeze_bn",
    "fuse_bn",
    "kept_bn_stats",
    "recompute_bn_stats",
    "set_ghost_batch_size",
    "unfreeze_bn",
]
