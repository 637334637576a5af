"""The Tracker protocol and an in-memory tracker (tests, and training without MLflow)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    """What the engine logs through: one active run at a time."""

    def start_run(
        self,
        name: str | None = None,
        *,
        parent_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
    ) -> str:
        """Starts a run (or resumes ``run_id``) and returns its id."""
        ...

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def end_run(self, status: str = "FINISHED") -> None: ...


def check_status(status: str) -> str:
    if status not in RUN_STATUSES:
        raise ValueError(f"status={status!r} is not one of {', '.join(repr(s) for s in RUN_STATUSES)}")
    return status


@dataclass
class MemoryRun:
    """One run as the MemoryTracker holds it; ``metrics[key]`` is a list of ``(step, value)``."""

    run_id: str
    name: str | None = None
    parent_id: str | None = None
    status: str = "RUNNING"
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)

    def metric(self, key: str) -> list[float]:
        """The values of a metric in logging order."""
        return [value for _, value in self.metrics.get(key, [])]


class MemoryTracker:
    """Keeps runs in a dict (``runs``); values are stored as MLflow would store them (params and tags as
    strings, metrics as floats). Artifacts are recorded by path, not copied. Runs nest like MLflow's: a run
    started while another is active becomes the active one until it ends."""

    def __init__(self) -> None:
        self.runs: dict[str, MemoryRun] = {}
        self.stack: list[str] = []  # active runs, innermost last
        self.last: str | None = None  # the run most recently started

    @property
    def run(self) -> MemoryRun:
        """The active run, else the run most recently started."""
        run_id = self.stack[-1] if self.stack else self.last
        if run_id is None:
            raise RuntimeError("no run was started")
        return self.runs[run_id]

    def start_run(
        self,
        name: str | None = None,
        *,
        parent_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
    ) -> str:
        run_id = run_id or uuid.uuid4().hex
        run = self.runs.setdefault(run_id, MemoryRun(run_id=run_id, name=name, parent_id=parent_id))
        run.status = "RUNNING"
        if parent_id is not None:
            run.tags["mlflow.parentRunId"] = parent_id
        self.stack.append(run_id)
        self.last = run_id
        self.set_tags(tags or {})
        return run_id

    def log_params(self, params: dict) -> None:
        self.run.params.update({str(k): str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.run.metrics.setdefault(key, []).append((step, float(value)))

    def set_tags(self, tags: dict) -> None:
        self.run.tags.update({str(k): str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.run.artifacts.append((Path(path), artifact_path))

    def end_run(self, status: str = "FINISHED") -> None:
        if not self.stack:
            raise RuntimeError("no active run to end")
        self.runs[self.stack.pop()].status = check_status(status)
