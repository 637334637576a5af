"""Delta checkpoints: a fine-tuned model stored as the tensors that differ from the model file it started from.

A delta file is ``{"kind": "vitbn-delta", "config", "delta", "base", "data", "vitbn_version"}``: the fine-tuned
model's config, the tensors of its ``state_dict`` that differ from the base file's (another shape or other values,
or a key the base does not have), the base file's name, path and SHA-256, and the ``InputSpec`` of the data it was
fine-tuned on. ``load_delta`` rebuilds the model from the delta and the very base file it was made from (the hash
says so) and nothing else. After an attention-only fine-tuning the delta is a fraction of the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitbn.engine.checkpoint import (
    DELTA_KIND,
    InputSpec,
    _read_model_file,
    atomic_save,
    resolve_model_path,
    torch_load,
    unwrap,
)
from vitbn.errors import UserError, first_line

DELTA_NAME = "delta.pt"
_HASH_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors of a state dict (``numel * element_size``), without the file's overhead."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def changed_tensors(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that are not in ``base`` with the same shape, dtype and values."""
    return {k: v for k, v in state.items() if not _same(v, base.get(k))}


def _base_name(path: Path) -> str:
    """``RUN/model.pt`` for a run's model (every run's file is ``model.pt``), else the file name."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def save_delta(model: nn.Module, base_path: str | Path, path: str | Path, data: Any = None) -> dict[str, torch.Tensor]:
    """Writes the delta of ``model`` against the model file ``base_path`` (or the run folder holding one) to
    ``path``, atomically.

    Args:
        model: the fine-tuned VisionTransformer (possibly wrapped; any device).
        base_path: the model file it was fine-tuned from.
        path: where the delta goes.
        data: the ``Dataset`` or ``PreparedData`` it was fine-tuned on (its ``InputSpec`` is recorded).

    Returns:
        The tensors written (on the CPU).
    """
    from vitbn import __version__
    from vitbn.config import to_dict

    base_path = resolve_model_path(base_path)
    base = _read_model_file(base_path, "cpu")
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    delta = changed_tensors(state, base["state_dict"])
    saved = {
        "kind": DELTA_KIND,
        "config": to_dict(model.config),
        "delta": delta,
        "base": {"name": _base_name(base_path), "path": str(base_path), "sha256": file_sha256(base_path)},
        "vitbn_version": __version__,
    }
    if data is not None:
        info = getattr(data, "info", data)
        saved["data"] = InputSpec(info.name, tuple(info.classes), tuple(info.mean), tuple(info.std)).to_dict()
    atomic_save(saved, path)
    return delta


def read_delta(path: str | Path) -> dict[str, Any]:
    """The contents of a delta file; one-line UserError for a missing, unreadable or other file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"delta file {path} does not exist")
    saved = torch_load(path)
    if not isinstance(saved, dict) or saved.get("kind") != DELTA_KIND:
        raise UserError(f"{path} is not a vitbn delta checkpoint (written by `vitbn finetune` as delta.pt)")
    return saved


def load_delta(path: str | Path, base_path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The fine-tuned model (in eval mode) of a delta file and the base model file it was made from.

    Raises:
        UserError: a missing delta or base, a base with another SHA-256 than the delta's (another file, or the
            same path overwritten since), a delta that does not fit its config.
    """
    from vitbn.config import ModelConfig, from_dict
    from vitbn.models import build_model

    saved = read_delta(path)
    want = saved["base"]
    base_path = resolve_model_path(base_path)
    if not base_path.is_file():
        raise UserError(f"base model {base_path} does not exist (delta {path} was made from {want['name']})")
    sha = file_sha256(base_path)
    if sha != want["sha256"]:
        raise UserError(
            f"delta {path} was made from base {want['name']} with sha256 {want['sha256']}, {base_path} has {sha}: "
            "pass the base it was made from"
        )
    base = _read_model_file(base_path, "cpu")["state_dict"]
    delta = saved["delta"]
    try:
        model = build_model(from_dict(ModelConfig, saved["config"]))
        state = {k: delta[k] if k in delta else base[k] for k in model.state_dict() if k in delta or k in base}
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"delta {path} does not fit its config and base: {first_line(exc)}") from None
    return model.to(map_location).eval()
