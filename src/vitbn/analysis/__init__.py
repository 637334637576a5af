"""Analyses of trained models: attention maps and attention rollout."""

from vitbn.analysis.attention import attention_maps, patch_attention, rollout

__all__ = ["attention_maps", "patch_attention", "rollout"]
