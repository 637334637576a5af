"""Tags describing where a run ran: code version, package versions, machine."""

from __future__ import annotations

import socket
import subprocess
from importlib import metadata
from pathlib import Path


def git_commit(path: str | Path | None = None, timeout: float = 5.0) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: the vitbn sources), or "unknown"."""
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=timeout, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def environment_tags(device: str, threads: int) -> dict[str, str]:
    """The tags every training run carries."""
    import torch

    import vitbn
    from vitbn.provenance import machine_name

    commit = git_commit()
    tags = {
        "git_commit": commit,
        "version.torch": torch.__version__,
        "version.vitbn": vitbn.__version__,
        "version.mlflow": package_version("mlflow"),
        "device": device,
        "threads": str(threads),
        "hostname": socket.gethostname(),
        "machine": machine_name(device),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags
