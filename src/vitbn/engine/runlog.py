"""The tracking calls at the two ends of a training run: start (run folder, config, tags, params) and close
(artifacts, status). Plain functions over the run (``vitbn.engine.loop._Run``): what they read is named here."""

from __future__ import annotations

import json
from typing import Any

import torch

from vitbn.config import save_yaml
from vitbn.engine.checkpoint import MODEL_NAME, deferred_interrupt
from vitbn.engine.distributed import from_main
from vitbn.engine.history import write_history
from vitbn.engine.selection import BEST_NAME
from vitbn.engine.setup import run_params
from vitbn.models.attention import attention_choices, captured_path
from vitbn.tracking.env import environment_tags

END_STATUS = {"finished": "FINISHED", "diverged": "FAILED", "killed": "KILLED", "failed": "FAILED"}
ATTN_TAG = "vitbn.attn_choices"


def start_tracking(run: Any, parent_run_id: str | None) -> None:
    """Writes ``config.yaml`` (rank 0), starts (or, on resume, continues) the tracked run with the environment
    tags, and logs the params. Sets ``run.run_id`` and ``run._started``."""
    if run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(run.config.to_dict(), run.out_dir / "config.yaml")
    tags = {**environment_tags(str(run.device), torch.get_num_threads()), "vitbn.status": "running"}
    tags["threads_choice"] = getattr(run, "threads_choice", "default")
    tags.update({"dist.world_size": run.info.world_size, "dist.backend": run.info.backend or "none"})
    if run.start_epoch:
        tags["vitbn.resumed_from_epoch"] = run.start_epoch
    run.run_id = run.tracker.start_run(run.run_name, parent_id=parent_run_id, tags=tags, run_id=run.run_id)
    if run.info.distributed:
        run.run_id = from_main(run.run_id)  # rank 0's MLflow run, also in the other ranks' results
    run._started = True
    params = run_params(run.config, run.model)
    if run.prepbn is not None:  # the resolved defaults of the ramp
        params.update({"prepbn.warmup_steps": run.prepbn.ramp.warmup, "prepbn.end_step": run.prepbn.ramp.end})
    run.tracker.log_params(params)


def close_tracking(run: Any, status: str, quiet: bool = False) -> None:
    """Logs the run's files (config, history; the model and the best model of a finished run), tags its status
    and ends it (FINISHED, FAILED or KILLED). ``quiet``: errors of the tracker are swallowed (the run is failing
    already)."""
    with deferred_interrupt():
        try:
            if run.info.is_main:
                for path in [run.out_dir / "config.yaml", *write_history(run.history, run.out_dir)]:
                    run.tracker.log_artifact(path)
                if status == "finished":
                    run.tracker.log_artifact(run.out_dir / MODEL_NAME, "model")
                    if (run.out_dir / BEST_NAME).is_file():
                        run.tracker.log_artifact(run.out_dir / BEST_NAME, "model")
            log_attention_choices(run)  # the final evaluation may have chosen for a new shape
            run.tracker.set_tags({"vitbn.status": status})
            run.tracker.end_run(END_STATUS[status])
        except Exception:
            if not quiet:
                raise


def log_attention_choices(run: Any) -> None:
    """Adds the attention paths that ``attn_impl="auto"`` chose since the last call (choice key -> path, see
    ``vitbn.models.attention``) to ``run.attn_choices`` (what the checkpoint keeps, so that a resumed run takes
    the same paths), and tags the run with them as JSON when they changed. A compiled model's ``"auto"`` takes
    ``captured_path`` in its training graph, tagged under the key ``"torch.compile"``."""
    choices = {**run.attn_choices, **attention_choices(run.model)}
    tagged = dict(choices)
    if run.net.compiled and run.model.config.attn_impl == "auto":
        device = next(run.model.parameters()).device.type
        tagged["torch.compile"] = captured_path(device, grad=True)
    if tagged != run.attn_tagged:
        run.tracker.set_tags({ATTN_TAG: json.dumps(tagged, sort_keys=True)})
    run.attn_choices, run.attn_tagged = choices, tagged
