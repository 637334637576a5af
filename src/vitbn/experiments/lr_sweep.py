"""Experiment 1: every model x learning rate x seed of a preset, each a nested MLflow run under one parent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vitbn.errors import UserError
from vitbn.experiments.presets import ExperimentPreset, ModelSpec
from vitbn.experiments.runner import ChildResult, open_experiment
from vitbn.experiments.runs import child_tags

log = logging.getLogger(__name__)
KIND = "lr-sweep"


@dataclass
class SweepResult:
    """The parent run and one result per planned child, in plan order."""

    parent_id: str
    results: list[ChildResult]

    def count(self, action: str) -> int:
        """How many children were trained ("new"), resumed ("resume") or skipped as done ("done")."""
        return sum(r.action == action for r in self.results)


def plan(preset: ExperimentPreset) -> list[tuple[ModelSpec, float, int]]:
    """The (model, lr, seed) of every run, models innermost: the models of one (seed, lr) run one after the other,
    so a change of load on the machine during the sweep falls on every model alike rather than on the ones that
    happen to run last."""
    return [(spec, lr, seed) for seed in preset.seeds for lr in preset.lrs for spec in preset.models]


def run_lr_sweep(preset: ExperimentPreset, *, progress: str = "auto") -> SweepResult:
    """Runs (or continues) the sweep of ``preset``.

    Children already FINISHED, or FAILED with ``vitbn.status=diverged``, are not repeated; an interrupted one
    (KILLED, RUNNING, or FAILED otherwise) is resumed from its checkpoint. The parent ends FINISHED, or KILLED on
    Ctrl-C, FAILED on an error.

    Args:
        preset: the recipe (see ``vitbn.experiments.presets``).
        progress: the engine's progress display (``"auto"``, ``"bar"``, ``"lines"``, ``"none"``).

    Returns:
        The parent run id and the children's results.
    """
    if not preset.lrs:
        raise UserError(f"preset {preset.name!r} has no learning rates to sweep (a tuning preset? use `tune`)")
    exp = open_experiment(KIND, preset, progress=progress)
    with exp.closing():
        for i, (spec, lr, seed) in enumerate(plan(preset), 1):
            config = preset.base_config(spec, lr=lr, seed=seed)
            tc = config.train
            tags = child_tags("sweep", spec.label, spec.name, spec.depth, lr, tc.batch_size, seed, tc.epochs)
            result = exp.run_child(config, tags)
            log.info(
                "[%d/%d] %s lr=%g seed=%d: %s (%s)",
                i,
                len(plan(preset)),
                spec.label,
                lr,
                seed,
                result.status,
                result.action,
            )
    return SweepResult(exp.parent_id, exp.results)
