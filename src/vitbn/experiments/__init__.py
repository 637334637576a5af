"""The study's experiments: recipes (``presets``), the learning-rate sweep (``lr_sweep``, experiment 1) and the
Bayesian optimization of lr and batch size (``hpo``, experiment 2), each as nested MLflow runs under one parent."""

from vitbn.experiments.hpo import TuneResult, run_tuning
from vitbn.experiments.lr_sweep import SweepResult, run_lr_sweep
from vitbn.experiments.presets import (
    PRESETS,
    ExperimentPreset,
    ModelSpec,
    list_presets,
    load_preset,
    override_preset,
)

__all__ = [
    "PRESETS",
    "ExperimentPreset",
    "ModelSpec",
    "SweepResult",
    "TuneResult",
    "list_presets",
    "load_preset",
    "override_preset",
    "run_lr_sweep",
    "run_tuning",
]
