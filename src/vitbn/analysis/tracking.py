"""Logging an analysis to the MLflow run that trained the model: the files as artifacts under ``analysis/``, the
headline numbers as metrics ``analysis/...``; the run's status is left as it is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vitbn.errors import UserError, first_line

ARTIFACT_PATH = "analysis"


def recorded_run(model_path: Path) -> tuple[str | None, str | None, str]:
    """The MLflow run id and tracking URI that the run folder of ``model_path`` records (``checkpoint.pt``'s
    ``run_id``, ``config.yaml``'s ``track.tracking_uri``), and, when there is no run id, why not."""
    from vitbn.config import load_yaml
    from vitbn.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint

    folder = model_path.parent
    if not (folder / CHECKPOINT_NAME).is_file():
        return None, None, f"no {CHECKPOINT_NAME} beside {model_path.name} records an MLflow run"
    try:
        run_id = load_checkpoint(folder / CHECKPOINT_NAME).get("run_id")
    except UserError as exc:
        return None, None, first_line(exc)
    if not run_id:
        return None, None, "the run was not tracked"
    uri = None
    if (folder / "config.yaml").is_file():
        uri = (load_yaml(folder / "config.yaml").get("track") or {}).get("tracking_uri")
    return str(run_id), uri, ""


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``analysis/lambda_max``, its residual, ``analysis/active_fraction_mean`` and the per-block values."""
    h = result["hessian"]
    metrics = {
        "analysis/lambda_max": h["lambda_max"],
        "analysis/lambda_max_residual": h["residual"],
        "analysis/lambda_max_converged": float(h["converged"]),
        "analysis/active_fraction_mean": result["active_fraction"]["mean"],
        "analysis/seconds": result["seconds"]["total"],
    }
    metrics.update({f"analysis/lambda_max/{name}": e["lambda_max"] for name, e in h["blocks"].items()})
    metrics.update({f"analysis/active_fraction/{k}": v for k, v in result["active_fraction"].items() if k != "mean"})
    return {k: float(v) for k, v in metrics.items()}


def log_analysis(run_id: str, tracking_uri: str | None, result: dict[str, Any], out_dir: Path) -> str:
    """Logs the files of ``result`` (in ``out_dir``) and its headline metrics to the existing run ``run_id``.

    Returns:
        The tracking URI used.

    Raises:
        UserError: the store is unreachable or does not hold the run (one line).
    """
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from vitbn.tracking import check_tracking_uri, quiet_mlflow, resolve_tracking_uri

    quiet_mlflow()
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    try:
        client.get_run(run_id)
        metrics = [Metric(k, v, now, 0) for k, v in headline_metrics(result).items()]
        client.log_batch(run_id, metrics=metrics)
        for name in result["files"]:
            client.log_artifact(run_id, str(out_dir / name), ARTIFACT_PATH)
    except (MlflowException, OSError) as exc:
        raise UserError(f"MLflow run {run_id} in {uri}: {first_line(exc)}") from None
    return uri
