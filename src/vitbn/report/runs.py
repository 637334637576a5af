"""Tracked runs -> the DataFrames the report is computed from (``vitbn.report.tables`` documents them)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache

import pandas as pd
import yaml

from vitbn.config import ModelConfig, from_dict, to_dict
from vitbn.experiments.runs import child_runs
from vitbn.models import build_model, count_params, forward_flops

# History columns <- MLflow metric names (logged with step = epoch).
METRICS = {
    "train_loss": "train/loss",
    "test_acc": "test/acc",
    "val_acc": "val/acc",
    "train_s": "time/train_epoch_s",
    "test_time_s": "time/test_epoch_s",
    "val_time_s": "time/val_epoch_s",
    "precise_s": "time/precise_bn_s",  # PreciseBN before each evaluation (train.precise_bn)
}


@dataclass
class RunSet:
    """What the report shows: comparison runs (sweep or tuned finals), their histories, tuning trials."""

    runs: pd.DataFrame
    history: pd.DataFrame
    trials: pd.DataFrame
    per_epoch_test: bool = True  # False: per-epoch curves use the validation split (test set only at the end)
    notes: list[str] = field(default_factory=list)
    best: dict[str, dict] = field(default_factory=dict)  # tuning: label -> the chosen {lr, batch_size, val_acc, trial}

    def to_dict(self) -> dict:
        """Plain JSON-able data (NaN -> None), read back by ``from_dict``."""

        def records(frame: pd.DataFrame) -> dict:
            clean = frame.astype(object).where(frame.notna(), None)
            return {"columns": list(frame.columns), "rows": clean.values.tolist()}

        return {
            "runs": records(self.runs),
            "history": records(self.history),
            "trials": records(self.trials),
            "per_epoch_test": self.per_epoch_test,
            "notes": list(self.notes),
            "best": self.best,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunSet:
        def frame(part: dict) -> pd.DataFrame:
            out = pd.DataFrame(part["rows"], columns=part["columns"]).infer_objects()
            for column in out.columns[out.isna().all()]:
                out[column] = math.nan  # all None (e.g. PreciseBN seconds of runs without it): a float column
            return out

        return cls(
            frame(data["runs"]),
            frame(data["history"]),
            frame(data["trials"]),
            per_epoch_test=bool(data["per_epoch_test"]),
            notes=list(data.get("notes", [])),
            best=dict(data.get("best", {})),
        )


def _param(text: str):
    """A logged param string back to its value (params are logged as ``str(value)``)."""
    if text == "None":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def model_config_from_params(params: dict[str, str]) -> ModelConfig:
    """The ModelConfig of a run from its flattened ``model.*`` params."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k[6:]: _param(v) for k, v in params.items() if k.startswith("model.") and k[6:] in names}
    for key in ("image_size", "patch_size"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    fields["name"] = str(fields.get("name", "custom"))
    return from_dict(ModelConfig, fields)


@lru_cache(maxsize=64)
def _size(config_json: str) -> tuple[int, int]:
    model = build_model(from_dict(ModelConfig, json.loads(config_json)))
    return count_params(model), forward_flops(model)


def model_size(params: dict[str, str]) -> tuple[int, int]:
    """(parameters, forward FLOPs per image): logged by the engine when it does, else computed from the config."""
    if "model.num_params" in params and "model.flops_per_image" in params:
        return int(params["model.num_params"]), int(params["model.flops_per_image"])
    return _size(json.dumps(to_dict(model_config_from_params(params)), sort_keys=True))


def _history(client, run_id: str) -> pd.DataFrame:
    frame = pd.DataFrame({"epoch": pd.Series(dtype="int64")})
    for column, key in METRICS.items():
        points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        part = pd.DataFrame({"epoch": list(points), column: list(points.values())})
        frame = part if frame.empty and len(part) else frame.merge(part, on="epoch", how="outer")
    frame = frame[frame["epoch"] >= 1].copy()
    for column in METRICS:
        if column not in frame:
            frame[column] = math.nan
    frame.insert(0, "run_id", run_id)
    return frame.sort_values("epoch")


def _row(run) -> dict:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    n_params, flops = model_size(params)
    final = metrics.get("test/acc", metrics.get("val/acc", math.nan))
    return {
        "run_id": run.info.run_id,
        "phase": tags.get("vitbn.phase", ""),
        "model": tags.get("vitbn.model"),
        "depth": int(tags.get("vitbn.depth", 0)),
        "label": tags.get("vitbn.label"),
        "lr": float(tags.get("vitbn.lr", "nan")),
        "batch_size": int(tags.get("vitbn.batch_size", 0)),
        "seed": int(tags.get("vitbn.seed", 0)),
        "epochs": int(tags.get("vitbn.epochs", 0)),
        "train_subset": params.get("data.train_subset", "None"),  # as run, whatever the preset's prose says
        "test_subset": params.get("data.test_subset", "None"),
        "trial": int(tags.get("vitbn.trial", -1)),
        "status": tags.get("vitbn.status", run.info.status.lower()),
        "mlflow_status": run.info.status,
        "final_acc": final,
        "val_acc": metrics.get("val/acc", math.nan),
        "best_epoch": metrics.get("best/epoch", math.nan),  # the epoch chosen on validation (best.pt), if any
        "best_val_acc": metrics.get("best/val_acc", math.nan),
        "best_test_acc": metrics.get("best/test_acc", math.nan),  # the test set read once, for that epoch
        "objective": metrics.get("hpo/objective", metrics.get("val/acc", math.nan)),
        "params": n_params,
        "flops": flops,
        "test_every_epoch": params.get("data.test_every_epoch", "True") == "True",
        "commit": tags.get("git_commit", "unknown")[:7],
        "machine": tags.get("machine", f"host {tags.get('hostname', 'unknown')}"),
        "threads": tags.get("threads", "?"),
        "torch": tags.get("version.torch", "?"),
    }


def _trials(rows: list[dict]) -> pd.DataFrame:
    trials = pd.DataFrame(
        [
            {
                "label": r["label"],
                "trial": r["trial"],
                "acc": r["objective"],
                "lr": r["lr"],
                "batch_size": r["batch_size"],
                "status": r["status"],
            }
            for r in rows
            if r["phase"] == "trial"
        ],
        columns=["label", "trial", "acc", "lr", "batch_size", "status"],
    )
    return trials.sort_values(["label", "trial"]).reset_index(drop=True)


def best_from_tags(tags: dict[str, str]) -> dict[str, dict]:
    """The tuning's chosen parameters per label from the parent's ``vitbn.best.<label>`` tags
    ("lr=0.0012 batch_size=64 val_acc=0.9812 trial=7")."""
    out = {}
    for key, value in tags.items():
        if key.startswith("vitbn.best."):
            fields = dict(part.split("=", 1) for part in value.split())
            out[key[len("vitbn.best.") :]] = {
                "lr": float(fields["lr"]),
                "batch_size": int(fields["batch_size"]),
                "val_acc": float(fields["val_acc"]),
                "trial": int(fields["trial"]),
            }
    return out


# Children a report compares (tuning trials are listed apart): sweep runs, tuned models' final runs, and the
# transfer experiment's pre-training and target runs.
COMPARED_PHASES = ("sweep", "final", "pretrain", "transfer")


def load_run_set(client, parent) -> RunSet:
    """Reads the children of ``parent`` (an MLflow Run) and their metric histories."""
    children = child_runs(client, parent.info.run_id, parent.info.experiment_id)
    rows = [_row(r) for r in children if r.info.status != "RUNNING"]  # in progress (or crashed): not shown
    compared = [r for r in rows if r["phase"] in COMPARED_PHASES]
    notes = []
    unfinished = [r["label"] for r in compared if r["mlflow_status"] == "KILLED"]
    if unfinished:
        notes.append(f"{len(unfinished)} run(s) were interrupted and are shown as far as they got: {unfinished}")
    runs = pd.DataFrame(compared)
    best = best_from_tags(parent.data.tags)
    if runs.empty:
        return RunSet(runs, pd.DataFrame(), _trials(rows), notes=notes, best=best)
    runs["setting"] = [
        f"tuned, {epochs} epochs" if phase == "final" else f"lr={lr:g}"
        for lr, phase, epochs in zip(runs["lr"], runs["phase"], runs["epochs"])
    ]
    per_epoch_test = bool(runs["test_every_epoch"].all())
    history = pd.concat([_history(client, run_id) for run_id in runs["run_id"]], ignore_index=True)
    history["acc"] = history["test_acc"] if per_epoch_test else history["val_acc"]
    history["test_s"] = history["test_time_s"] if per_epoch_test else history["val_time_s"]
    if not per_epoch_test:
        notes.append(
            "The test set was evaluated once, at the end: per-epoch accuracy and evaluation time are the "
            "validation split's; final accuracy is the test set's."
        )
    return RunSet(runs, history, _trials(rows), per_epoch_test=per_epoch_test, notes=notes, best=best)
