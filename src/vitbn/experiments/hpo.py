"""Experiment 2: Bayesian optimization (Ax ``Client``: Sobol, then BoTorch) of the learning rate and the batch size
of every model, then the tuned models trained side by side.

The Ax state is written to a JSON file after every change (a trial created, completed or failed) and logged as an
artifact of the parent run, so an interrupted tuning resumes where it stopped: the file is loaded, a trial left
running is run again under its own index and parameters, and new trials are asked for only up to
``HPOConfig.trials``.

The objective is the validation accuracy averaged over the last ``HPOConfig.objective_epochs`` epochs of a trial
(one last-epoch accuracy is noisy). A diverged trial is *marked failed* to Ax: a made-up 0 would be an observation
far outside the others and would bend the Gaussian process around it; the trial counts against the budget like any
other. The best parameters are those the BoTorch model, fitted on every completed trial, predicts best among the
evaluated arms (the raw best observation when there is no model yet, as during Sobol), not the raw maximum of a
noisy objective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitbn.config import HPOConfig
from vitbn.errors import UserError
from vitbn.experiments.presets import ExperimentPreset, ModelSpec
from vitbn.experiments.runner import ChildResult, Experiment, open_experiment
from vitbn.experiments.runs import child_tags

log = logging.getLogger(__name__)
KIND = "tune"
OBJECTIVE = "val_acc"
# The study's learning-rate ranges: the LayerNorm ViT diverges above 1e-3, the BatchNorm models are searched wider.
STUDY_LR_RANGE = {"vit": (1e-5, 1e-3)}
DEFAULT_LR_RANGE = (1e-5, 1e-2)


@dataclass
class TrialOutcome:
    """What one trial returns to the loop: ``status`` "finished" | "diverged", and the objective."""

    status: str
    val_acc: float


def lr_range(model: str, hpo: HPOConfig) -> tuple[float, float]:
    """The learning-rate bounds: ``hpo.lr_min`` / ``hpo.lr_max`` when set, else the study's range for the model."""
    lo, hi = STUDY_LR_RANGE.get(model, DEFAULT_LR_RANGE)
    lo, hi = hpo.lr_min or lo, hpo.lr_max or hi
    if not 0 < lo < hi:
        raise UserError(f"learning-rate range [{lo}, {hi}] must satisfy 0 < lr_min < lr_max")
    return lo, hi


def ax_client_class() -> type:
    """``ax.api.client.Client``, imported with Ax's INFO chatter off (its storage set-up on import, a line per
    trial: vitbn logs its own line per trial)."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        from ax.api.client import Client
        from ax.utils.common.logger import set_stderr_log_level
    finally:
        logging.disable(previous)
    set_stderr_log_level(logging.WARNING)
    return Client


def new_client(name: str, lr_bounds: tuple[float, float], hpo: HPOConfig):
    """An Ax Client: lr (log scale) and batch size (integer), maximize ``val_acc``, ``hpo.sobol_trials`` Sobol
    trials (seeded) and then BoTorch."""
    from ax.api.configs import RangeParameterConfig

    if hpo.sobol_trials < 1:
        raise UserError("hpo.sobol_trials=0: BoTorch needs observed trials to fit its model; use 1 or more")
    client = ax_client_class()(random_seed=hpo.seed)
    client.configure_experiment(
        parameters=[
            RangeParameterConfig(name="lr", bounds=lr_bounds, parameter_type="float", scaling="log"),
            RangeParameterConfig(name="batch_size", bounds=(hpo.batch_min, hpo.batch_max), parameter_type="int"),
        ],
        name=name,
    )
    client.configure_optimization(objective=OBJECTIVE)
    client.configure_generation_strategy(
        initialization_budget=hpo.sobol_trials,
        initialization_random_seed=hpo.seed,
        initialize_with_center=False,  # plain Sobol then BoTorch, as in the study
    )
    return client


def trial_table(client) -> list[dict[str, Any]]:
    """One dict per trial: ``trial_index``, ``trial_status``, ``generation_node``, ``lr``, ``batch_size`` and
    ``val_acc`` (when observed), from ``Client.summarize``."""
    frame = client.summarize()
    return [] if frame.empty else frame.to_dict("records")


def optimize(
    state_path: str | Path,
    make_client: Callable[[], Any],
    evaluate: Callable[[int, dict], TrialOutcome],
    trials: int,
    *,
    on_save: Callable[[Path], None] | None = None,
) -> Any:
    """The Ax loop: runs trials until ``trials`` exist and none is left running; resumes from ``state_path``.

    Args:
        state_path: the JSON state (``Client.save_to_json_file``); loaded when it exists.
        make_client: builds a configured Client when there is no state yet.
        evaluate: ``(trial index, parameters) -> TrialOutcome``; a trial interrupted earlier is passed again.
        trials: the total number of trials (a later call with a larger number continues the tuning).
        on_save: called with the path after every save (e.g. to log it as an artifact).

    Returns:
        The Client.
    """
    path = Path(state_path)
    client = ax_client_class().load_from_json_file(str(path)) if path.exists() else make_client()

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        client.save_to_json_file(str(tmp))
        tmp.replace(path)  # atomic: an interrupted save leaves the previous state
        if on_save is not None:
            on_save(path)

    def run(index: int, params: dict) -> None:
        outcome = evaluate(index, params)
        if outcome.status == "diverged" or not math.isfinite(outcome.val_acc):
            client.mark_trial_failed(index, failed_reason=f"{outcome.status}: no finite validation accuracy")
        else:
            client.complete_trial(index, raw_data={OBJECTIVE: float(outcome.val_acc)})
        save()

    table = trial_table(client)
    for row in table:  # left running by an interrupted process: same index, same parameters
        if row["trial_status"] == "RUNNING":
            run(int(row["trial_index"]), {"lr": float(row["lr"]), "batch_size": int(row["batch_size"])})
    for _ in range(len(table), trials):
        (index, params), *_ = client.get_next_trials(max_trials=1).items()
        save()  # the new trial's parameters are kept before it trains
        run(index, params)
    return client


def fit_model(client) -> None:
    """Fits the generation strategy's current model on every observation so far.

    Ax predicts with the model it fitted to generate the latest trial: that model has not seen the latest trial's
    result, and a process that resumed a finished tuning has no model at all. ``Client`` has no public refit, so this
    goes through its generation strategy's public ``fit``. Nothing is fitted before a trial has completed.
    """
    if not any(row.get("trial_status") == "COMPLETED" for row in trial_table(client)):
        return
    strategy = client._generation_strategy
    strategy.fit(experiment=client._experiment)


def best_parameters(client) -> tuple[dict, float, int]:
    """(parameters, val_acc, trial index) of the evaluated arm that the model, fitted on every trial, predicts best,
    with the predicted val_acc (Ax falls back to the best raw observation when there is no model yet, as during
    Sobol, or when the model fits its observations poorly)."""
    fit_model(client)
    params, outcome, index, _ = client.get_best_parameterization(use_model_predictions=True)
    value = outcome[OBJECTIVE]
    return dict(params), float(value[0] if isinstance(value, tuple) else value), int(index)


def last_epochs_mean(exp: Experiment, result: ChildResult, k: int) -> float:
    """The mean validation accuracy of the trial's last ``k`` epochs (its MLflow ``val/acc`` history; fewer epochs
    when it ran fewer); NaN when it has none (diverged before a validation pass)."""
    if result.run_id is None:
        return result.final.get("val/acc", math.nan)
    points = sorted(exp.client.get_metric_history(result.run_id, "val/acc"), key=lambda m: (m.step, m.timestamp))
    by_epoch = {m.step: m.value for m in points}  # a resumed epoch logged twice: its last value
    values = [by_epoch[e] for e in sorted(by_epoch)][-k:]
    return sum(values) / len(values) if values else math.nan


def _trial_evaluator(exp: Experiment, spec: ModelSpec, hpo: HPOConfig) -> Callable[[int, dict], TrialOutcome]:
    def evaluate(index: int, params: dict) -> TrialOutcome:
        config = exp.preset.base_config(spec, lr=params["lr"], seed=hpo.seed)
        config.train.batch_size = int(params["batch_size"])
        config.train.epochs = hpo.epochs
        config.data.test_every_epoch = False  # the objective is the validation accuracy: test once, at the end
        tags = child_tags(
            "trial",
            spec.label,
            spec.name,
            spec.depth,
            params["lr"],
            params["batch_size"],
            hpo.seed,
            hpo.epochs,
            trial=index,
        )
        result = exp.run_child(config, tags)
        acc = last_epochs_mean(exp, result, hpo.objective_epochs)
        if result.run_id is not None and not math.isnan(acc):
            exp.client.log_metric(result.run_id, "hpo/objective", acc)  # what Ax was told, for the report
        log.info(
            "%s trial %d lr=%.3g batch=%d: %s val_acc=%.4f",
            spec.label,
            index,
            params["lr"],
            params["batch_size"],
            result.status,
            acc,
        )
        return TrialOutcome(result.status, acc)

    return evaluate


def tune_model(exp: Experiment, spec: ModelSpec, trials: int | None = None) -> tuple[dict, float, int]:
    """Tunes one model (resuming its saved Ax state); returns its best (parameters, val_acc, trial index)."""
    base = exp.preset.base_config(spec)
    hpo = base.hpo
    state = exp.out_dir / f"ax_{spec.label}.json"
    if not state.exists():
        _fetch_state(exp, state)
    client = optimize(
        state,
        lambda: new_client(f"{exp.preset.name}-{spec.label}", lr_range(spec.name, hpo), hpo),
        _trial_evaluator(exp, spec, hpo),
        trials or hpo.trials,
        on_save=lambda p: exp.log_artifact(p, "ax"),
    )
    return best_parameters(client)


def _fetch_state(exp: Experiment, state: Path) -> None:
    """Restores the Ax state from the parent run's artifacts when the local file is gone (another machine, a
    cleaned output folder)."""
    from mlflow.exceptions import MlflowException

    try:
        if f"ax/{state.name}" not in {a.path for a in exp.client.list_artifacts(exp.parent_id, "ax")}:
            return
        exp.client.download_artifacts(exp.parent_id, f"ax/{state.name}", str(state.parent))
    except (MlflowException, OSError):
        return
    log.info("restored the Ax state %s from parent run %s", state.name, exp.parent_id)


@dataclass
class TuneResult:
    """The parent run, the best parameters per model label, the final runs' results."""

    parent_id: str
    best: dict[str, tuple[dict, float, int]]
    finals: list[ChildResult]


def run_tuning(
    preset: ExperimentPreset, *, trials: int | None = None, final: bool = True, progress: str = "auto"
) -> TuneResult:
    """Tunes every model of ``preset`` and (when ``final``) trains each tuned model for ``preset.final_epochs``
    epochs per seed, as nested runs of one parent (tagged ``vitbn.phase`` trial / final).

    Args:
        preset: the recipe; its ``run.data.val_size`` must be > 0 (the objective is validation accuracy).
        trials: overrides ``hpo.trials`` (e.g. to stop after a few and continue later).
        final: also train the tuned models.
        progress: the engine's progress display.
    """
    base = preset.base_config(preset.models[0])
    if base.data.val_size <= 0 and not base.data.val_fraction:
        raise UserError(f"tuning maximizes validation accuracy: preset {preset.name!r} has data.val_size=0 and no "
                        "data.val_fraction; set one")  # fmt: skip
    exp = open_experiment(KIND, preset, progress=progress)
    best, finals = {}, []
    with exp.closing():
        for spec in preset.models:
            best[spec.label] = tune_model(exp, spec, trials)
            params, acc, index = best[spec.label]
            exp.client.set_tag(
                exp.parent_id,
                f"vitbn.best.{spec.label}",
                f"lr={params['lr']:.6g} batch_size={params['batch_size']} val_acc={acc:.6f} trial={index}",
            )
        if final:
            finals = [
                _train_final(exp, spec, best[spec.label][0], seed) for spec in preset.models for seed in preset.seeds
            ]
    return TuneResult(exp.parent_id, best, finals)


def _train_final(exp: Experiment, spec: ModelSpec, params: dict, seed: int) -> ChildResult:
    config = exp.preset.base_config(spec, lr=params["lr"], seed=seed)
    config.train.batch_size = int(params["batch_size"])
    config.train.epochs = exp.preset.final_epochs or config.train.epochs
    tags = child_tags(
        "final", spec.label, spec.name, spec.depth, params["lr"], params["batch_size"], seed, config.train.epochs
    )
    result = exp.run_child(config, tags)
    log.info("%s tuned, seed %d: %s (%s)", spec.label, seed, result.status, result.action)
    return result
