"""MLflow tracking through ``MlflowClient`` (no global fluent state, so nested and resumed runs are explicit)."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vitbn.errors import UserError
from vitbn.tracking.base import check_status

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
# MLflow's own limits: params per log_batch, metrics per log_batch, characters of a param / tag value.
_MAX_PARAMS, _MAX_METRICS, _MAX_PARAM_CHARS, _MAX_TAG_CHARS = 100, 1000, 6000, 5000

log = logging.getLogger(__name__)


def quiet_mlflow() -> None:
    """Silences MLflow's and alembic's INFO chatter (e.g. the migrations on a new SQLite store)."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store ``mlruns.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(uri: str, timeout: float = 5.0, *, reading: bool = False) -> None:
    """Fails fast, in one line, when the tracking store cannot be used (``reading``: by a command that only reads
    runs, so the error does not suggest ``--no-track``, which such a command does not have).

    An http(s) server must answer ``/health`` (or the experiments API) within ``timeout`` seconds; no retries,
    so a dead server is reported at once instead of after MLflow's minutes of back-off. A SQLite file must
    lie in an existing folder.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri.rstrip("/"), timeout, "start it or pass another --tracking-uri" if reading else
                      "start it, pass another --tracking-uri, or --no-track")  # fmt: skip
    elif parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:" and not Path(path).resolve().parent.is_dir():
            raise UserError(f"tracking URI {uri}: folder {Path(path).resolve().parent} does not exist")


def _check_server(base: str, timeout: float, hint: str) -> None:
    answers = []
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as response:
                if response.status == 200:
                    return
                answers.append(f"{path} -> HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            answers.append(f"{path} -> HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"MLflow tracking server {base} is not reachable ({reason}); {hint}") from None
    raise UserError(f"MLflow tracking server {base} does not answer like an MLflow server ({'; '.join(answers)})")


class MLflowTracker:
    """A Tracker writing to an MLflow tracking store. Runs nest: a run started while another is active is
    the active one until it ends (``run_id``), then the outer one is again.

    Args:
        tracking_uri: any MLflow URI (``sqlite:///mlruns.db``, ``http://host:5000``, ...).
        experiment: the experiment name; created when missing.
    """

    def __init__(self, tracking_uri: str, experiment: str = "vitbn") -> None:
        from mlflow import MlflowClient

        quiet_mlflow()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri)
        self.stack: list[str] = []  # active runs, innermost last
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(self.experiment)
            except MlflowException:  # created meanwhile by a parallel run
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {self.experiment!r} is deleted; restore it or pick another name")
        return found.experiment_id

    def start_run(
        self,
        name: str | None = None,
        *,
        parent_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
    ) -> str:
        tags = {str(k): _text(v, _MAX_TAG_CHARS) for k, v in (tags or {}).items()}
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id
        if run_id is not None and self._run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.stack.append(run_id)
            self.set_tags(tags)
            return run_id
        if run_id is not None:
            log.warning("MLflow run %s is not in %s; starting a new run", run_id, self.tracking_uri)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.stack.append(run.info.run_id)
        return run.info.run_id

    @property
    def run_id(self) -> str | None:
        """The active run's id."""
        return self.stack[-1] if self.stack else None

    def _run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        return run.info.lifecycle_stage != "deleted"

    @property
    def _active(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run was started")
        return self.run_id

    def log_params(self, params: dict) -> None:
        """Logs params; on a resumed run, params already there with the same value are skipped, and a changed
        value (which MLflow refuses to overwrite) is recorded as tag ``vitbn.param_changed.<key>``."""
        from mlflow.entities import Param

        existing = self.client.get_run(self._active).data.params
        new = {str(k): _text(v, _MAX_PARAM_CHARS) for k, v in params.items()}
        changed = {k: v for k, v in new.items() if k in existing and existing[k] != v}
        todo = [Param(k, v) for k, v in new.items() if k not in existing]
        for i in range(0, len(todo), _MAX_PARAMS):
            self.client.log_batch(self._active, params=todo[i : i + _MAX_PARAMS])
        if changed:
            self.set_tags({f"vitbn.param_changed.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(self._active, metrics=items[i : i + _MAX_METRICS])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), _text(v, _MAX_TAG_CHARS)) for k, v in tags.items()]
        if items:
            self.client.log_batch(self._active, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._active, str(path), artifact_path)

    def end_run(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self._active, check_status(status))
        self.stack.pop()


def _text(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
