"""Runs the children of an experiment under one MLflow parent: skips those done, resumes those interrupted."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitbn.config import RunConfig
from vitbn.errors import UserError
from vitbn.experiments.presets import ExperimentPreset, describe_overrides, load_preset, write_preset_yaml
from vitbn.experiments.runs import (
    child_key,
    child_runs,
    child_state,
    experiment_id,
    index_children,
    mlflow_client,
    open_parent,
)

log = logging.getLogger(__name__)


class TaggingTracker:
    """A Tracker that adds tags to the runs the engine starts, and continues a given MLflow run (an interrupted
    child) instead of creating one. Everything else goes to the wrapped tracker."""

    def __init__(self, inner: Any, tags: dict[str, str], resume_run_id: str | None = None) -> None:
        self.inner = inner
        self.tags = dict(tags)
        self.resume_run_id = resume_run_id

    def start_run(
        self,
        name: str | None = None,
        *,
        parent_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
    ) -> str:
        return self.inner.start_run(
            name, parent_id=parent_id, tags={**(tags or {}), **self.tags}, run_id=run_id or self.resume_run_id
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class ChildResult:
    """One child: ``status`` ("finished" | "diverged" | "killed"), its final metrics and what was done:
    ``action`` "new" (trained), "resume" (continued) or "done" (found finished or diverged: skipped)."""

    key: tuple[str, ...]
    status: str
    run_id: str | None
    final: dict[str, float]
    action: str


@dataclass
class Experiment:
    """An open parent run and the children found under it."""

    kind: str
    preset: ExperimentPreset
    client: Any
    exp_id: str
    parent_id: str
    tracker: Any
    out_dir: Path
    children: dict[tuple[str, ...], Any] = field(default_factory=dict)
    progress: str = "auto"
    results: list[ChildResult] = field(default_factory=list)

    def run_child(self, config: RunConfig, tags: dict[str, str], train: Callable | None = None) -> ChildResult:
        """Trains one child (``fit``, or ``train(config, tracker=, parent_run_id=, progress=)`` returning what fit
        returns), unless it is done; an interrupted one is resumed from its checkpoint."""
        from vitbn.engine import fit

        key = child_key(tags)
        state = child_state(self.children.get(key))
        if state.action == "done":
            metrics = self.client.get_run(state.run_id).data.metrics
            result = ChildResult(key, state.status, state.run_id, dict(metrics), "done")
        else:
            config.track.run_name = run_name(tags)
            config.train.out_dir = str(self.out_dir)
            # An interrupted child continues from its checkpoint; so does a checkpoint left in the output folder
            # by a run the tracking store does not know (e.g. a new store).
            checkpoint = self.out_dir / config.track.run_name / "checkpoint.pt"
            config.train.resume = state.action == "resume" or checkpoint.exists()
            tracker = TaggingTracker(self.tracker, tags, state.run_id)
            fitted = (train or fit)(config, tracker=tracker, parent_run_id=self.parent_id, progress=self.progress)
            result = ChildResult(key, fitted.status, fitted.run_id, dict(fitted.final), state.action)
            if fitted.run_id is not None:
                self.children[key] = self.client.get_run(fitted.run_id)
        self.results.append(result)
        if result.status == "killed":
            raise KeyboardInterrupt  # the user stopped the child: stop the experiment too
        return result

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status)

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Ends the parent run FINISHED when the block completes, KILLED on Ctrl-C, FAILED on an error."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.close(status)


def run_name(tags: dict[str, str]) -> str:
    """``vitbn-d1-lr0.0005-bs100-s0`` (``-t3`` for trial 3): the child's MLflow run and checkpoint folder name."""
    name = f"{tags['vitbn.label']}-lr{float(tags['vitbn.lr']):.4g}-bs{tags['vitbn.batch_size']}-s{tags['vitbn.seed']}"
    if "vitbn.trial" in tags:
        name += f"-t{tags['vitbn.trial']}"
    return f"{tags['vitbn.phase']}-{name}"


def parent_name(kind: str, preset: ExperimentPreset) -> str:
    """The preset's name, with the shared settings that differ from the registered preset of that name."""
    try:
        reference = load_preset(preset.name)
    except UserError:  # a preset from a YAML file with a new name: nothing to compare with
        return preset.name
    diff = describe_overrides(preset, reference)
    return f"{preset.name} ({diff})" if diff else preset.name


def open_experiment(kind: str, preset: ExperimentPreset, *, progress: str = "auto") -> Experiment:
    """Finds (by kind, preset name and shared-settings hash) or creates the parent run and lists its children.

    MLflow settings (``track``) and the output root (``train.out_dir``) come from the preset's shared ``run``.
    """
    from vitbn.tracking import make_tracker

    base = preset.base_config(preset.models[0])
    tracker = make_tracker(base.track)
    client = mlflow_client(base.track.tracking_uri)
    exp_id = experiment_id(client, base.track.experiment, create=True)
    tags = {"vitbn.kind": kind, "vitbn.preset": preset.name, "vitbn.preset_hash": preset.shared_hash()}
    parent_id, created = open_parent(client, exp_id, parent_name(kind, preset), tags)
    client.set_tag(parent_id, "vitbn.description", preset.description)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preset.yaml"
        write_preset_yaml(preset, path)
        client.log_artifact(parent_id, str(path))  # the latest invocation's recipe (subsets of lrs, seeds)
    out_dir = Path(base.train.out_dir) / f"{kind}-{preset.name}-{preset.shared_hash()}"
    children = index_children(child_runs(client, parent_id, exp_id))
    log.info(
        "%s %s: parent run %s (%s), %d child run(s) found",
        kind,
        preset.name,
        parent_id,
        "new" if created else "found",
        len(children),
    )
    return Experiment(kind, preset, client, exp_id, parent_id, tracker, out_dir, children, progress)
