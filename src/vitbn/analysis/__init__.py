"""Analyses of trained models: attention maps and rollout, lambda_max of the loss Hessian (whole and per parameter
block), active neurons, weight norms and a filter-normalized loss-landscape slice. ``vitbn.analysis.run.analyze``
runs them all (``vitbn analyze``); the figures are in ``vitbn.analysis.figures`` (matplotlib, imported there only).
"""

from vitbn.analysis.activity import active_fraction, weight_norms
from vitbn.analysis.attention import attention_maps, patch_attention, rollout
from vitbn.analysis.common import BN_MODES, analysis_mode, mean_loss, parameter_blocks
from vitbn.analysis.hessian import Eigen, block_lambda_max, hvp, lambda_max, power_iteration
from vitbn.analysis.landscape import LandscapeSlice, filter_normalized_direction, loss_slice

__all__ = [
    "BN_MODES",
    "Eigen",
    "LandscapeSlice",
    "active_fraction",
    "analysis_mode",
    "attention_maps",
    "block_lambda_max",
    "filter_normalized_direction",
    "hvp",
    "lambda_max",
    "loss_slice",
    "mean_loss",
    "parameter_blocks",
    "patch_attention",
    "power_iteration",
    "rollout",
    "weight_norms",
]
