"""Atomic checkpoints of a run, and the exported model (weights + config).

Everything written here loads with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
containers only (the numpy RNG state is stored as a tensor).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitbn.errors import UserError, first_line

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
DELTA_KIND = "vitbn-delta"  # the "kind" of a fine-tuning delta (vitbn.engine.delta): not a whole model


_defer = {"depth": 0, "received": 0}  # nesting depth of deferred blocks; SIGINTs held back


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) until the block is done, then raises KeyboardInterrupt; so that a file
    being written, or a run being closed, is finished first. Nested blocks defer to the outermost one.
    A no-op outside the main thread (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _defer["depth"] += 1
    if _defer["depth"] > 1:
        try:
            yield
        finally:
            _defer["depth"] -= 1
        return
    _defer["received"] = 0
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _defer.update(received=_defer["received"] + 1))
    try:
        yield
    finally:
        _defer["depth"] = 0
        signal.signal(signal.SIGINT, previous)
    if _defer["received"]:
        _defer["received"] = 0
        raise KeyboardInterrupt


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: readers see the old file or
    the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with deferred_interrupt():
            torch.save(obj, tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The states of torch (CPU and CUDA), numpy and Python generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` captured. A checkpoint may hold the CUDA states of more GPUs than are visible
    now (a run trained with 8 visible, resumed with ``CUDA_VISIBLE_DEVICES=0``): the visible devices get theirs
    and one warning says how many states were dropped."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        kept, note = cuda_states_for(state["cuda"], torch.cuda.device_count())
        for index, cuda_state in enumerate(kept):
            torch.cuda.set_rng_state(cuda_state, index)
        if note:
            warnings.warn(note, stacklevel=2)


def cuda_states_for(states: list[torch.Tensor], visible: int) -> tuple[list[torch.Tensor], str | None]:
    """The CUDA generator states of a checkpoint that the ``visible`` devices take (device i gets state i), and a
    one-line note when some are dropped (None when all fit; devices beyond the saved states keep theirs)."""
    states = list(states)
    if len(states) <= visible:
        return states, None
    dropped = len(states) - visible
    return states[:visible], (
        f"the checkpoint holds the CUDA RNG states of {len(states)} GPUs but {visible} are visible: restored "
        f"those of GPUs 0-{visible - 1}, dropped {dropped} (random streams of those GPUs are not continued)"
        if visible
        else f"the checkpoint holds the CUDA RNG states of {len(states)} GPUs but none is visible: dropped them"
    )


def torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file it cannot read is one line, "not a vitbn model file: PATH (why)",
    never PyTorch's advice to retry with ``weights_only=False`` (which would run whatever code the file holds)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        text = str(exc)
        why = "it holds no PyTorch weights" if "weights_only" in text or not text.strip() else first_line(exc)
        raise UserError(f"not a vitbn model file: {path} ({why})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by the engine, with a one-line UserError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = torch_load(path, map_location)
    missing = {"model", "optimizer", "epoch", "history", "config", "rng"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise UserError(f"checkpoint {path} is not a vitbn checkpoint (missing {sorted(missing)})")
    return ckpt


def restore_state(
    ckpt: dict, path: Path, *, model: nn.Module, optimizer, scheduler, scaler, train, steps_per_epoch: int
) -> list[str]:
    """Loads a checkpoint's model, optimizer, scheduler and GradScaler states in place (a resume); returns the
    notes to show (a schedule rescaled to more epochs). A checkpoint of another model or optimizer is one line."""
    from vitbn.engine.optim import load_scheduler

    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"checkpoint {path} does not fit this model/optimizer: {first_line(exc)}") from None
    notes = []
    if scheduler is not None and ckpt.get("scheduler"):
        note = load_scheduler(scheduler, ckpt["scheduler"], train, steps_per_epoch)
        notes += [note] if note else []
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return notes


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind its wrappers: ``torch.compile``'s (``_orig_mod``) and DDP's (``module``), in any order."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def export_model(model: nn.Module, path: str | Path, data: Any = None, meta: dict | None = None) -> Path:
    """Writes ``{"config", "state_dict", "vitbn_version", "data"}`` (tensors on CPU) atomically; ``load_model``
    reads it. ``data`` (a ``Dataset`` or ``PreparedData``) records what the model's input is: the dataset's name,
    class names and the per-channel mean/std the images were normalized with, so that a model file alone is
    enough to predict (``load_inference``). ``meta`` (plain values) is stored under ``"meta"``, e.g. the epoch
    and validation accuracy of a run's best model."""
    from vitbn import __version__
    from vitbn.config import to_dict

    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved = {"config": to_dict(model.config), "state_dict": state, "vitbn_version": __version__}
    if meta:
        saved["meta"] = dict(meta)
    if data is not None:
        info = getattr(data, "info", data)
        saved["data"] = InputSpec(info.name, tuple(info.classes), tuple(info.mean), tuple(info.std)).to_dict()
    atomic_save(saved, path)
    return Path(path)


@dataclass(frozen=True)
class InputSpec:
    """What a trained model takes: images of ``dataset``, scaled to [0, 1] and normalized per channel as
    ``(x - mean) / std``, and the names of its classes."""

    dataset: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(str(d["dataset"]), tuple(str(c) for c in d["classes"]), tuple(d["mean"]), tuple(d["std"]))


def resolve_model_path(path: str | Path) -> Path:
    """A model file, or a run folder (``runs/NAME``) holding one: its ``model.pt``."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_NAME).is_file():
            raise UserError(f"run folder {path} has no {MODEL_NAME} (the run did not finish?)")
        return path / MODEL_NAME
    return path


def _read_model_file(path: Path, map_location) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"model file {path} does not exist")
    saved = torch_load(path, map_location)
    if isinstance(saved, dict) and saved.get("kind") == DELTA_KIND:
        base = saved.get("base", {}).get("name", "its base")
        raise UserError(
            f"model file {path} is a fine-tuning delta of {base}, not a whole model: load it with its base "
            f"(vitbn eval {path} --base BASE)"
        )
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= set(saved):
        raise UserError(f"model file {path} is not a vitbn model (expected keys 'config' and 'state_dict')")
    return saved


def _build_saved(path: Path, saved: dict[str, Any], map_location) -> nn.Module:
    from vitbn.config import ModelConfig, from_dict
    from vitbn.models import build_model

    try:
        model = build_model(from_dict(ModelConfig, saved["config"]))
        model.load_state_dict(saved["state_dict"])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"model file {path} does not match its config: {first_line(exc)}") from None
    return model.to(map_location).eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A VisionTransformer (in eval mode) from a file written by ``export_model``, or from a run folder holding
    one; one-line UserError for a missing or corrupt file."""
    path = resolve_model_path(path)
    return _build_saved(path, _read_model_file(path, map_location), map_location)


def load_inference(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, InputSpec]:
    """The model of ``load_model`` and its ``InputSpec``. A file written before the spec was recorded takes it
    from the ``config.yaml`` of its run folder (the dataset named there, loaded for its statistics)."""
    path = resolve_model_path(path)
    saved = _read_model_file(path, map_location)
    model = _build_saved(path, saved, map_location)
    if isinstance(saved.get("data"), dict):
        return model, InputSpec.from_dict(saved["data"])
    return model, _spec_from_run_folder(path)


def _spec_from_run_folder(path: Path) -> InputSpec:
    from vitbn.config import RunConfig, load_yaml
    from vitbn.data import prepare_data

    config_file = path.parent / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"model file {path} does not say what its input is, and no config.yaml is beside it")
    info = prepare_data(RunConfig.from_dict(load_yaml(config_file)).data).info
    return InputSpec(info.name, tuple(info.classes), tuple(info.mean), tuple(info.std))
