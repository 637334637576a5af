"""Experiment tracking: a small Tracker protocol, MLflow behind it, and an in-memory tracker."""

from __future__ import annotations

from vitbn.config import TrackConfig
from vitbn.tracking.base import MemoryRun, MemoryTracker, Tracker
from vitbn.tracking.mlflow_tracker import (
    DEFAULT_TRACKING_URI,
    MLflowTracker,
    check_tracking_uri,
    quiet_mlflow,
    resolve_tracking_uri,
)


def make_tracker(cfg: TrackConfig) -> Tracker:
    """The tracker a config asks for: MLflow at ``cfg.tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlruns.db`` in the working directory), checked for reachability first; a MemoryTracker when
    tracking is disabled."""
    if not cfg.enabled:
        return MemoryTracker()
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_tracking_uri(uri)
    return MLflowTracker(uri, cfg.experiment)


__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowTracker",
    "MemoryRun",
    "MemoryTracker",
    "Tracker",
    "check_tracking_uri",
    "make_tracker",
    "quiet_mlflow",
    "resolve_tracking_uri",
]
