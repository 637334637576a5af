"""The reference a training step is judged against: vit-pytorch's ``ViT`` trained the plain way.

vit-pytorch is NOT a dependency of vitbn (it pulls in torchvision, which would replace the CPU build of torch).
Make a throwaway copy outside the project's environment, ``pip install --no-deps --target /tmp/vp vit-pytorch
einops``, and pass its folder (``vitbn bench --reference /tmp/vp``, ``benchmarks/vs_vit_pytorch.py --vit-pytorch
/tmp/vp``). ``PATH/vit_pytorch/vit.py`` is loaded by file path (the package's ``__init__`` imports modules that
need torchvision), with PATH on ``sys.path`` for einops.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vitbn.errors import UserError

# The study's MNIST ViT in vit-pytorch's keywords.
STUDY = dict(
    image_size=28, patch_size=7, num_classes=10, dim=64, depth=6, heads=8, mlp_dim=128, channels=1, dim_head=64
)
REF = "vit-pytorch"


def reference_file(path: str | Path) -> Path:
    """``PATH/vit_pytorch/vit.py``; a one-line UserError that says how to make the copy when it is not there."""
    vit_py = Path(path) / "vit_pytorch" / "vit.py"
    if not vit_py.is_file():
        raise UserError(
            f"no vit_pytorch/vit.py under {path}; make a copy: pip install --no-deps --target {path} vit-pytorch einops"
        )
    return vit_py


def load_reference(path: str | Path) -> type:
    """vit-pytorch's ``ViT`` class from ``PATH/vit_pytorch/vit.py``; a one-line UserError without it."""
    vit_py = reference_file(path)
    sys.path.insert(0, str(Path(path).resolve()))
    spec = importlib.util.spec_from_file_location("vit_pytorch_vit", vit_py)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise UserError(f"{vit_py} cannot be imported: {exc} (is einops in {path}?)") from None
    return module.ViT


# The autocast dtype of each precision, as vitbn's engine uses them (None: no autocast, fp32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32), so that the reference runs in the precision vitbn runs
    in; a one-line UserError for a name that is not a precision."""
    if precision not in AUTOCAST_DTYPES:
        raise UserError(f"precision={precision!r} is not one of {', '.join(map(repr, AUTOCAST_DTYPES))}")
    return AUTOCAST_DTYPES[precision]


def plain_step(model: torch.nn.Module, precision: str, x: torch.Tensor, y: torch.Tensor, compile: bool) -> Callable:
    """The reference's training step as a plain PyTorch script writes it: ``Adam(model.parameters())`` with
    PyTorch's default implementation, ``zero_grad()``, ``F.cross_entropy``, ``backward()``, ``step()``; under
    autocast in ``precision``, and for fp16 with a ``GradScaler`` (as vitbn's step)."""
    net = torch.compile(model) if compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(x.device.type) if precision == "fp16" else None

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
            return
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def reference_cases(
    path: str | Path,
    *,
    precisions: tuple[str, ...],
    compile: bool,
    batch: int,
    device: torch.device,
    warmup: int,
    min_repeat_s: float,
) -> dict[tuple[str, bool], object]:
    """The reference's training step at the study's configuration (depth 6), per precision, eager and (with
    ``compile``) compiled, built and warmed up: ``{(precision, compiled): Case}``. A compiled case that fails
    carries its error and is not timed."""
    from vitbn.bench.cases import first_line
    from vitbn.bench.timing import Case, warm_up

    ref_cls = load_reference(path)
    cases = {}
    for precision in precisions:
        for compiled in (False, True) if compile else (False,):
            model = ref_cls(**STUDY).to(device).train()
            x = torch.randn(batch, STUDY["channels"], STUDY["image_size"], STUDY["image_size"], device=device)
            y = torch.randint(0, STUDY["num_classes"], (batch,), device=device)
            name = f"{REF}@6 {precision} train{' compiled' if compiled else ''}"
            case = Case(name, plain_step(model, precision, x, y, compiled), images=batch, device=device)
            try:
                warm_up(case, warmup, min_repeat_s)
            except Exception as exc:  # a compiler failure surfaces at the first call
                if not compiled:
                    raise
                case.error = first_line(exc)
            cases[(precision, compiled)] = case
    return cases
