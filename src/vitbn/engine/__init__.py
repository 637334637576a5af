"""Training engine: ``fit`` (train, evaluate, time, checkpoint, track), ``evaluate``, model export."""

from vitbn.engine.checkpoint import InputSpec, export_model, load_checkpoint, load_inference, load_model
from vitbn.engine.device import resolve_device, seed_everything
from vitbn.engine.evaluate import evaluate
from vitbn.engine.loop import FitResult, fit
from vitbn.engine.optim import WarmupCosine, build_optimizer, build_scheduler, param_groups

__all__ = [
    "FitResult",
    "InputSpec",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "export_model",
    "fit",
    "load_checkpoint",
    "load_inference",
    "load_model",
    "param_groups",
    "resolve_device",
    "seed_everything",
]
