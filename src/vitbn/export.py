"""Exporting a model for inference outside vitbn, and checking that the written file computes what the model does.

``export_onnx`` writes an ONNX file (``torch.onnx.export``, the current ``torch.export``-based exporter) with a
dynamic batch axis, input ``"image"`` (B, C, H, W) float32 and output ``"logits"`` (B, classes), the BatchNorms
folded into the neighbouring Linears first (``vitbn.bn.fuse_bn``) unless ``fuse=False``; its ``metadata_props``
say how to preprocess (the ``InputSpec``) and which vitbn model it is. ``export_torchscript`` writes the traced
model (``torch.jit.trace``; PyTorch deprecates TorchScript, ONNX is the format to prefer). ``parity`` compares a
written file's logits with the eager model's. ONNX needs the ``export`` extra (onnx, onnxruntime, onnxscript).

Every file is written to a temporary name beside the target and renamed, so an interrupted export leaves no
half-written file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vitbn.errors import UserError, first_line

if TYPE_CHECKING:
    from vitbn.engine.checkpoint import InputSpec

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}
INPUT_NAME, OUTPUT_NAME = "image", "logits"
TOLERANCE = 1e-4  # max abs logit difference an fp32 export may have against the eager model
EXTRA_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
EXTRA_HINT = "needs the export extra: pip install 'vitbn[export]' (onnx, onnxruntime, onnxscript)"
# metadata_props keys (ONNX) and the JSON of the TorchScript file's extra file ``vitbn.json``
META_SPEC, META_MODEL, META_CONFIG = "vitbn.input_spec", "vitbn.model", "vitbn.config"
META_FOLDED, META_VERSION, META_PREPROCESS = "vitbn.bn_folded", "vitbn.version", "vitbn.preprocessing"
TORCHSCRIPT_EXTRA = "vitbn.json"


def missing_extra() -> list[str]:
    """The packages of the export extra that do not import here (empty when ONNX export works)."""
    missing = []
    for name in EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_onnx(what: str = "--format onnx") -> None:
    """Raises a one-line UserError naming the extra when onnx, onnxruntime or onnxscript is missing."""
    missing = missing_extra()
    if missing:
        raise UserError(f"{what} {EXTRA_HINT}; not importable here: {', '.join(missing)}")


def inference_copy(model: nn.Module, fuse: bool = True) -> nn.Module:
    """An fp32, CPU, eval-mode copy of ``model``, with its BatchNorms folded when ``fuse`` (``fuse_bn``: raises a
    one-line ValueError for a model it cannot fold, e.g. a PRepBN at lambda > 0)."""
    from vitbn.bn import fuse_bn
    from vitbn.engine.checkpoint import unwrap

    model = copy.deepcopy(unwrap(model)).float().cpu().eval()
    return fuse_bn(model) if fuse else model


def example_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded (batch, C, H, W) standard-normal float32 input of the model's image shape."""
    from vitbn.config import pair

    c = model.config
    h, w = pair(c.image_size)
    return torch.randn(batch, c.channels, h, w, generator=torch.Generator().manual_seed(seed))


def export_metadata(model: nn.Module, spec: InputSpec | None, fuse: bool) -> dict[str, str]:
    """What the exported file says about itself (ONNX ``metadata_props``, all strings): the InputSpec as JSON (or
    "null" when the model file recorded none), the vitbn model name and config, whether BN is folded, the version."""
    from vitbn import __version__
    from vitbn.config import to_dict

    return {
        META_SPEC: json.dumps(spec.to_dict() if spec is not None else None),
        META_MODEL: model.config.name,
        META_CONFIG: json.dumps(to_dict(model.config)),
        META_FOLDED: json.dumps(bool(fuse)),
        META_VERSION: __version__,
        META_PREPROCESS: f"input '{INPUT_NAME}' (B, C, H, W) float32: the image scaled to [0, 1], then "
        f"(x - mean) / std per channel with mean and std of {META_SPEC}; output '{OUTPUT_NAME}' (B, classes), "
        "classes in its order",
    }


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; renames it to ``path`` when the block succeeds (Ctrl-C
    held back during the rename), and removes it otherwise: readers see the old file or the new one."""
    from vitbn.engine.checkpoint import deferred_interrupt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with deferred_interrupt():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silences what the exporters report that a user cannot act on: torch.onnx's registry warnings (torchvision
    operators it skips), PyTorch-internal FutureWarnings/DeprecationWarnings and the tracer's warnings (its one
    data-dependent branch in ``attend`` is on the static branch count)."""
    # onnxscript's version converter logs a traceback when it cannot reach the opset asked for: export_onnx says so
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    loggers[0].setLevel(logging.ERROR)
    loggers[1].setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    model: nn.Module, path: str | Path, *, spec: InputSpec | None = None, opset: int | None = None, fuse: bool = True
) -> Path:
    """Writes ``model`` as ONNX, the batch axis dynamic (one file for batch 1 and batch 1000).

    Args:
        model: a ``VisionTransformer`` (copied; the caller's model is left as it is).
        path: the file to write (atomically).
        spec: the model's input (stored as JSON in ``metadata_props["vitbn.input_spec"]``); None: not known.
        opset: the ONNX opset; None: the exporter's default. The exporter writes its own opset and converts down;
            an opset it cannot convert this model to is an error, not a file of another opset.
        fuse: fold the BatchNorms first (``fuse_bn``); a model that cannot be folded raises a ValueError.

    Returns:
        The path written.
    """
    require_onnx("ONNX export")
    net = inference_copy(model, fuse)
    batch = torch.export.Dim("batch", min=1)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            net, (example_input(net),), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False,
        )  # fmt: skip
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        raise UserError(
            f"--opset {opset}: the exporter writes opset {written} and could not convert this model to {opset} "
            "(e.g. LayerNormalization exists from opset 17 on); use a later --opset, or leave it out"
        )
    program.model.metadata_props.update(export_metadata(model, spec, fuse))
    with atomic_target(path) as tmp:
        program.save(tmp, external_data=False)  # one self-contained file (models here are far below 2 GB)
    return Path(path)


def export_torchscript(model: nn.Module, path: str | Path, *, spec: InputSpec | None = None, fuse: bool = True) -> Path:
    """Writes ``model`` traced (``torch.jit.trace``) as TorchScript, the ``export_metadata`` as the extra file
    ``vitbn.json``; the traced graph takes any batch size. Arguments as ``export_onnx``'s."""
    net = inference_copy(model, fuse)
    with quiet_exporter(), torch.no_grad():
        traced = torch.jit.trace(net, example_input(net))
        with atomic_target(path) as tmp:
            meta = json.dumps(export_metadata(model, spec, fuse))
            torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_EXTRA: meta})
    return Path(path)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU with ``threads`` intra-op threads (default: PyTorch's
    ``torch.get_num_threads()``, so that comparisons with torch use the same cores) and one inter-op thread."""
    require_onnx("onnxruntime inference")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float32)


def onnx_logits(path_or_session: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The logits an ONNX file (a path, or a session from ``onnx_session``) computes for the images ``x``."""
    session = path_or_session
    if isinstance(path_or_session, (str, Path)):
        session = onnx_session(path_or_session)
    return session.run([OUTPUT_NAME], {INPUT_NAME: _numpy(x)})[0]


def torchscript_logits(path: str | Path, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The logits a TorchScript file computes for the images ``x``."""
    with quiet_exporter():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(_numpy(x))).numpy()


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dict."""
    require_onnx("reading ONNX metadata")
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    require_onnx("reading an ONNX file")
    import onnx

    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == "")


def torchscript_metadata(path: str | Path) -> dict[str, str]:
    """The ``export_metadata`` stored in a TorchScript file written by ``export_torchscript``."""
    extra = {TORCHSCRIPT_EXTRA: ""}
    with quiet_exporter():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")


def read_input_spec(metadata: dict[str, str]) -> InputSpec | None:
    """The InputSpec that an exported file's metadata holds (None when it recorded none)."""
    from vitbn.engine.checkpoint import InputSpec

    raw = json.loads(metadata.get(META_SPEC, "null"))
    return None if raw is None else InputSpec.from_dict(raw)


def parity_inputs(model: nn.Module, spec: InputSpec | None, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` inputs to compare an export on, and what they are: the first ``n`` test images of the model's
    dataset normalized with ``spec``'s mean and std when the dataset loads from disk (nothing is downloaded) and
    fits the model; else seeded uniform [0, 1] images normalized the same way (standard normal without a spec)."""
    from vitbn.config import DataConfig
    from vitbn.data import prepare_data
    from vitbn.engine.setup import check_data_fits_model

    reason = "the model file records no input spec"
    if spec is not None:
        try:
            data = prepare_data(DataConfig(dataset=spec.dataset, download=False, test_subset=n))
            check_data_fits_model(model.config, data.info)
            return _normalize(data.test.images.float() / 255.0, spec), f"{len(data.test)} test images of {spec.dataset}"
        except (UserError, OSError, ValueError) as exc:
            reason = f"{spec.dataset} did not load: {first_line(exc)}"
    x = example_input(model, n, seed)
    if spec is None:
        return x, f"{n} seeded random standard-normal inputs ({reason})"
    images = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return _normalize(images, spec), f"{n} seeded random images, uniform in [0, 1] and normalized ({reason})"


def _normalize(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return ((images - mean) / std).contiguous()


def parity(
    run: Callable[[torch.Tensor], np.ndarray], model: nn.Module, x: torch.Tensor, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """Compares the logits of an exported model (``run``, e.g. ``lambda x: onnx_logits(path, x)``) with the eager
    torch model as given (unfolded) and with its ``fuse_bn`` copy, at batch ``len(x)`` and at batch 1 (the first
    input alone: the dynamic batch axis).

    Returns:
        ``{"images", "max_abs_eager", "max_abs_folded"`` (None when the model does not fold), ``"folded_error"``,
        ``"top1_matches"`` (inputs whose exported argmax equals the eager one), ``"top1_agreement"`` (their
        fraction), ``"tolerance"``, ``"ok"`` (every difference at most ``tolerance``)``}``.
    """
    from vitbn.bn import fuse_bn

    model = inference_copy(model, fuse=False)
    exported, single = np.asarray(run(x)), np.asarray(run(x[:1]))
    with torch.no_grad():
        eager = model(x).numpy()
        try:
            folded, folded_error = fuse_bn(model)(x).numpy(), None
        except ValueError as exc:  # a PRepBN at lambda > 0: there is no folded model to compare with
            folded, folded_error = None, first_line(exc)

    def max_abs(reference: np.ndarray) -> float:
        return float(max(np.abs(exported - reference).max(), np.abs(single - reference[:1]).max()))

    diffs = {"eager": max_abs(eager), "folded": None if folded is None else max_abs(folded)}
    matches = int((exported.argmax(1) == eager.argmax(1)).sum())
    return {
        "images": len(x),
        "max_abs_eager": diffs["eager"],
        "max_abs_folded": diffs["folded"],
        "folded_error": folded_error,
        "top1_matches": matches,
        "top1_agreement": matches / len(x),
        "tolerance": tolerance,
        "ok": all(d <= tolerance for d in diffs.values() if d is not None),
    }
