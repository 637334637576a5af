"""The MLflow layout of an experiment: one parent run per (kind, preset, shared settings), nested child runs
tagged with what they are, found again by those tags so that a re-run skips or resumes them.

Tags of a parent: ``vitbn.role=parent``, ``vitbn.kind`` (``lr-sweep`` | ``tune``), ``vitbn.preset``,
``vitbn.preset_hash``. Tags of a child: ``vitbn.role=child``, ``vitbn.phase`` (``sweep`` | ``trial`` | ``final``),
``vitbn.model``, ``vitbn.depth``, ``vitbn.label``, ``vitbn.lr``, ``vitbn.batch_size``, ``vitbn.seed``,
``vitbn.epochs`` and, for tuning trials, ``vitbn.trial``. The engine adds ``vitbn.status`` (``finished`` |
``diverged``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from vitbn.errors import UserError

PARENT_KEYS = ("vitbn.kind", "vitbn.preset", "vitbn.preset_hash")
CHILD_KEYS = ("vitbn.phase", "vitbn.label", "vitbn.lr", "vitbn.batch_size", "vitbn.seed", "vitbn.epochs", "vitbn.trial")


def mlflow_client(uri: str | None = None, *, reading: bool = False):
    """An ``MlflowClient`` on the URI the engine's ``make_tracker`` resolves too (``uri``, else
    $MLFLOW_TRACKING_URI, else ``sqlite:///mlruns.db``), checked for reachability first (``reading``: for a
    command that only reads runs; see ``check_tracking_uri``)."""
    from mlflow.tracking import MlflowClient

    from vitbn.tracking import check_tracking_uri, quiet_mlflow, resolve_tracking_uri

    quiet_mlflow()
    uri = resolve_tracking_uri(uri)
    check_tracking_uri(uri, reading=reading)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, *, create: bool) -> str | None:
    """The id of the MLflow experiment ``name`` (created when asked; None if absent)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name) if create else None


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent(client, exp_id: str, tags: dict[str, str]):
    """The most recent parent run with these tags, or None."""
    where = " and ".join(["tags.`vitbn.role` = 'parent'", *(f"tags.`{k}` = {_quote(v)}" for k, v in tags.items())])
    runs = client.search_runs([exp_id], where, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_parent(client, exp_id: str, name: str, tags: dict[str, str]) -> tuple[str, bool]:
    """Finds the parent with ``tags`` (and marks it RUNNING again) or creates it. Returns (run id, created)."""
    found = find_parent(client, exp_id, tags)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, False
    run = client.create_run(exp_id, run_name=name, tags={"vitbn.role": "parent", **tags})
    return run.info.run_id, True


def child_runs(client, parent_id: str, exp_id: str) -> list:
    """The runs nested under ``parent_id``, oldest first."""
    where = f"tags.`mlflow.parentRunId` = {_quote(parent_id)}"
    return search_all(client, [exp_id], where, order_by=["attributes.start_time ASC"])


def child_key(tags: dict[str, Any]) -> tuple[str, ...]:
    """What identifies a child in its parent (the ``CHILD_KEYS`` tags, '' when absent)."""
    return tuple(str(tags.get(k, "")) for k in CHILD_KEYS)


def child_tags(
    phase: str,
    label: str,
    model: str,
    depth: int,
    lr: float,
    batch_size: int,
    seed: int,
    epochs: int,
    trial: int | None = None,
) -> dict[str, str]:
    """The tags of a child run (values as MLflow stores them: strings; ``repr`` keeps floats exact)."""
    tags = {
        "vitbn.role": "child",
        "vitbn.phase": phase,
        "vitbn.label": label,
        "vitbn.model": model,
        "vitbn.depth": str(depth),
        "vitbn.lr": repr(float(lr)),
        "vitbn.batch_size": str(int(batch_size)),
        "vitbn.seed": str(int(seed)),
        "vitbn.epochs": str(int(epochs)),
    }
    if trial is not None:
        tags["vitbn.trial"] = str(int(trial))
    return tags


@dataclass
class ChildState:
    """What a re-run does with a planned child: ``new``, ``done`` (finished or diverged: not repeated) or
    ``resume`` (an unfinished run: continued from its checkpoint)."""

    action: str
    run_id: str | None = None
    status: str | None = None  # "finished" | "diverged" for done runs


def child_state(run) -> ChildState:
    """Classifies an existing child run (None: none exists)."""
    if run is None:
        return ChildState("new")
    status, tag = run.info.status, run.data.tags.get("vitbn.status", "")
    if status == "FINISHED":
        return ChildState("done", run.info.run_id, "finished")
    if status == "FAILED" and tag == "diverged":
        return ChildState("done", run.info.run_id, "diverged")
    return ChildState("resume", run.info.run_id)


def index_children(runs: list) -> dict[tuple[str, ...], Any]:
    """Children by ``child_key``; the latest run wins when a key was run twice."""
    return {child_key(run.data.tags): run for run in runs}


def resolve_parent(client, key: str, experiment: str | None = None):
    """A parent run from its id, or the latest parent whose preset tag or run name is ``key``."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(key)
    except MlflowException:
        pass
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    for where in (f"tags.`vitbn.preset` = {_quote(key)}", f"attributes.run_name = {_quote(key)}"):
        runs = (
            client.search_runs(
                ids,
                f"tags.`vitbn.role` = 'parent' and {where}",
                max_results=100,
                order_by=["attributes.start_time DESC"],
            )
            if ids
            else []
        )
        if len(runs) > 1:
            others = ", ".join(r.info.run_id for r in runs[1:4]) + (" ..." if len(runs) > 4 else "")
            warnings.warn(
                f"{len(runs)} experiment runs match {key!r}: using the newest, {runs[0].info.run_id}; name another "
                f"by its run id ({others})",
                stacklevel=2,
            )
        if runs:
            return runs[0]
    raise UserError(f"no experiment run {key!r} (a parent run id, preset or run name) in {client.tracking_uri}")
