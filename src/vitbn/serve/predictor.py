"""A trained model ready to name images: loaded once, BatchNorm folded, eval mode, under ``inference_mode``.

Shared by ``vitbn predict`` and ``vitbn serve``; the preprocessing is ``vitbn.serve.preprocess``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitbn.analysis.attention import attention_maps, patch_attention, rollout
from vitbn.config import pair
from vitbn.engine.checkpoint import MODEL_NAME, InputSpec, load_inference
from vitbn.errors import UserError
from vitbn.serve.preprocess import ImageError, to_gray, to_mnist

STUDY_MODELS = ("vit", "vitbnffn", "vitbn")
PREPROCESS = ("auto", "mnist", "resize", "none")


@dataclass
class Prediction:
    """One model's answer for one image."""

    probs: list[float]  # one per class, summing to 1
    top: list[tuple[int, str, float]]  # (class index, class name, probability), most probable first
    latency_ms: float  # the forward pass (with attention capture when asked), not preprocessing
    model_input: np.ndarray  # the (H, W) or (H, W, C) uint8 image the model saw
    attention: np.ndarray | None = None  # (gh, gw) rollout of the pooled token over the patches, sums to 1


@dataclass
class Predictor:
    """A model for inference: ``load`` builds it from a model file or run folder."""

    model: nn.Module
    spec: InputSpec
    source: str
    folded: bool  # some BatchNorm was folded into its Linear
    note: str = ""  # what folding left, or why it could not fold
    params: int = 0  # the trained model's, as `vitbn eval` and `vitbn models` count them
    flops: int = 0
    name: str = ""  # the trained model's name (the folded copy's config names its folded norms "none")
    served_params: int = 0  # those of the model served (BatchNorm folded: its affine maps merged into Linear)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: str | Path, *, fuse: bool = True) -> Predictor:
        """Loads ``path`` (one line of UserError if missing or corrupt) and folds its BatchNorms when ``fuse``:
        a model that cannot be folded (PRepBN before its lambda reaches 0) is served unfolded, with the reason
        in ``note``."""
        from vitbn.bn import fuse_bn
        from vitbn.bn.fuse import unfolded_norms
        from vitbn.models import count_params, forward_flops

        model, spec = load_inference(path)
        name, folded, note, params = model.config.name, False, "", count_params(model)
        if fuse:
            try:
                fused = fuse_bn(model)
                model, folded = fused, fused.config != model.config  # a LayerNorm-only model has nothing to fold
                note = unfolded_norms(model) or ""
            except ValueError as exc:
                note = f"served unfolded: {exc}"
        model.eval().requires_grad_(False)
        return cls(model, spec, str(path), folded, note, params, forward_flops(model), name, count_params(model))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.channels, *pair(c.image_size))

    def prepare(self, image: np.ndarray, mode: str = "auto") -> np.ndarray:
        """A picture -> the uint8 image this model takes, (H, W) for one channel else (H, W, C).

        Modes: ``mnist`` (``to_mnist``: crop, 20x20 box, center of mass; grayscale models of square input),
        ``resize`` (to the model's size, Lanczos), ``none`` (must already have the model's size); ``auto`` is
        ``mnist`` for a one-channel model, else ``resize``.
        """
        if mode not in PREPROCESS:
            raise UserError(f"preprocess={mode!r}; choose from {PREPROCESS}")
        channels, h, w = self.input_shape
        if mode == "auto":
            mode = "mnist" if channels == 1 else "resize"
        if mode == "mnist":
            if channels != 1 or h != w:
                raise UserError(
                    f"the MNIST preprocessing makes square grayscale images; {self.name} takes {h}x{w}x{channels}"
                )
            return to_mnist(image, field=h)
        a = np.asarray(image)
        a = a.astype(np.float64) if channels != 1 else to_gray(a)
        if mode == "resize":
            from PIL import Image

            a = np.asarray(
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.LANCZOS)
            )
        return _check_shape(np.rint(a).astype(np.uint8), (channels, h, w))

    def tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 images as ``prepare`` returns them -> the normalized (B, C, H, W) float32 batch."""
        channels = self.input_shape[0]
        x = torch.from_numpy(np.stack(images)).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, H, W[, C]) -> (B, C, H, W)
        mean = torch.tensor(_per_channel(self.spec.mean, channels)).view(1, -1, 1, 1)
        std = torch.tensor(_per_channel(self.spec.std, channels)).view(1, -1, 1, 1)
        return (x - mean) / std

    def predict(self, images: list[np.ndarray], *, top_k: int = 3, attention: bool = False) -> list[Prediction]:
        """Class probabilities of prepared images (``prepare``); with ``attention``, the rollout map too."""
        if top_k < 1:
            raise UserError(f"top_k={top_k} must be >= 1")
        x = self.tensor(images)
        with self._lock, torch.inference_mode():  # one pass at a time: concurrent passes fight for the same cores
            start = time.perf_counter()
            if attention:
                logits, maps = attention_maps(self.model, x)
                flow = patch_attention(
                    rollout(maps), self.model.to_patch_embedding.grid, self.model.cls_token is not None
                )
            else:
                logits, flow = self.model(x), None
            seconds = time.perf_counter() - start
        probs = logits.float().softmax(dim=-1)
        k = min(top_k, probs.shape[-1])
        values, index = probs.topk(k, dim=-1)
        classes = self.spec.classes
        out = []
        for i, image in enumerate(images):
            top = [
                (int(j), classes[j] if j < len(classes) else str(int(j)), float(v)) for v, j in zip(values[i], index[i])
            ]
            out.append(
                Prediction(probs[i].tolist(), top, 1000 * seconds, image, None if flow is None else flow[i].numpy())
            )
        return out


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def _check_shape(a: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    channels, h, w = shape
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    want = (h, w) if channels == 1 else (h, w, channels)
    if a.shape != want:
        raise ImageError(f"the image is {a.shape} but the model takes {want}; use the mnist or resize preprocessing")
    return a


DEMO_DIR = "demo"  # under the runs folder: the demo's default model per name, kept by ``vitbn experiment best``


def _val_acc(path: Path) -> float:
    """The validation accuracy a selected checkpoint (``best.pt``) records in its ``meta``; -1 when it has none."""
    meta = torch.load(path, map_location="cpu", weights_only=True).get("meta") or {}
    return float(meta.get("best/val_acc", -1.0))


def keep_for_demo(checkpoint: str | Path, root: str | Path = "runs") -> Path | None:
    """Copies a selected checkpoint (``best.pt``, MNIST) to ``root/demo/<name>.pt``, the demo's default for its
    model name, when its recorded validation accuracy beats the one kept there (or none is); returns the kept path,
    or None when the one there is at least as good. The copy is atomic (temp file + rename)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name, dataset = payload["config"]["name"], (payload.get("data") or {}).get("dataset")
    if dataset != "mnist" or "best/val_acc" not in (payload.get("meta") or {}):
        raise UserError(f"{checkpoint}: not a checkpoint selected on an MNIST validation split (no best/val_acc)")
    target = Path(root) / DEMO_DIR / f"{name}.pt"
    if target.exists() and _val_acc(target) >= payload["meta"]["best/val_acc"]:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(Path(checkpoint).read_bytes())
    tmp.replace(target)
    return target


@dataclass(frozen=True)
class Candidate:
    """A model file that could be the demo's default for its name: its MNIST accuracy on validation (else test)."""

    path: Path
    name: str
    acc: float | None  # None: the file and its run folder record neither
    split: str  # "val" | "test" | ""
    mtime: float

    def describe(self) -> str:
        return f"{self.split} acc {100 * self.acc:.2f}%" if self.acc is not None else "no recorded accuracy"


def _candidate(path: Path) -> Candidate | None:
    """``path`` as a candidate, or None when it is unreadable or not a model trained on MNIST."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        name = saved["config"]["name"]
    except Exception:  # an unreadable file is not a candidate; one named on the command line is reported
        return None
    dataset = (saved.get("data") or {}).get("dataset")
    if dataset is None and (path.parent / "config.yaml").is_file():  # written before the input spec was recorded
        import yaml

        dataset = ((yaml.safe_load((path.parent / "config.yaml").read_text()) or {}).get("data") or {}).get("dataset")
    if dataset not in (None, "mnist"):
        return None
    meta = saved.get("meta") or {}
    if "best/val_acc" in meta:
        return Candidate(path, name, float(meta["best/val_acc"]), "val", path.stat().st_mtime)
    last = _last_record(path.parent / "history.json")
    for split in ("val", "test"):
        if f"{split}/acc" in last:
            return Candidate(path, name, float(last[f"{split}/acc"]), split, path.stat().st_mtime)
    return Candidate(path, name, None, "", path.stat().st_mtime)


def _last_record(history: Path) -> dict:
    import json

    try:
        records = json.loads(history.read_text())
        return records[-1] if isinstance(records, list) and records and isinstance(records[-1], dict) else {}
    except (OSError, ValueError):
        return {}


def choose_study_models(
    root: str | Path = "runs", names: tuple[str, ...] = STUDY_MODELS
) -> tuple[dict[str, Candidate], dict[str, int]]:
    """Per name of ``names``: the MNIST model with the best validation accuracy (else test accuracy; a model that
    records neither comes last, ties go to the newest) among the models kept for the demo (``root/demo/<name>.pt``,
    see ``keep_for_demo``) and every ``model.pt`` under ``root``. Models of other datasets (a fine-tune on digits)
    are not candidates.

    Returns:
        ``({name: chosen}, {name: number of candidates})``; a name with no candidate is in neither.
    """
    files = {*Path(root).glob(f"{DEMO_DIR}/*.pt"), *Path(root).rglob(MODEL_NAME)}
    found: dict[str, list[Candidate]] = {}
    for path in sorted(files):
        candidate = _candidate(path)
        if candidate is not None and candidate.name in names:
            found.setdefault(candidate.name, []).append(candidate)

    def rank(c: Candidate) -> tuple:
        return (c.acc is not None, c.acc or 0.0, c.path.parent.name == DEMO_DIR, c.mtime)

    chosen = {n: max(found[n], key=rank) for n in names if n in found}
    return chosen, {n: len(found[n]) for n in chosen}


def find_study_models(root: str | Path = "runs", names: tuple[str, ...] = STUDY_MODELS) -> list[Path]:
    """The paths ``choose_study_models`` chooses, in the order of ``names``."""
    return [c.path for c in choose_study_models(root, names)[0].values()]
