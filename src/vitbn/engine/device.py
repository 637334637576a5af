"""Device, precision and seeding: everything a run sets up once before the first step."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from vitbn.errors import UserError

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda, else mps, else cpu; an explicit device that is not available is a UserError."""
    name = str(name)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r}: CUDA is not available in this PyTorch build/machine; use cpu or auto")
    if kind == "mps" and not mps_ok:
        raise UserError(f"device={name!r}: MPS is not available on this machine; use cpu or auto")
    index = name.partition(":")[2]
    if kind == "cuda" and index.isdigit() and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(
            f"device={name!r}: {count} GPU(s) visible, cuda:0 to cuda:{count - 1}; see CUDA_VISIBLE_DEVICES"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


@dataclass
class Amp:
    """Mixed precision of a run: autocast dtype (None for fp32) and, for fp16, a GradScaler."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def make_amp(precision: str, device: torch.device, *, training: bool = True) -> Amp:
    """``fp32``; ``bf16`` autocast (CPU, CUDA, MPS); ``fp16`` autocast with a GradScaler (CUDA only)."""
    if precision not in _AMP_DTYPES:
        raise UserError(f"precision={precision!r} is not one of {', '.join(repr(p) for p in _AMP_DTYPES)}")
    dtype = _AMP_DTYPES[precision]
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"precision='fp16' needs a CUDA device (got {device.type}); use bf16 or fp32")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and training else None
    return Amp(device.type, dtype, scaler)


def set_tf32(enabled: bool) -> None:
    """One TF32 policy for fp32 work on CUDA: cuBLAS matrix products and cuDNN convolutions alike (PyTorch's own
    defaults differ: products in fp32, convolutions in TF32). Only Ampere and later GPUs have TF32. Set through the
    ``allow_tf32`` flags: mixing them with the newer ``fp32_precision`` ones makes torch raise when they are read."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def seed_everything(seed: int) -> None:
    """Seeds every generator a run draws from: torch (all devices), numpy and Python's ``random``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
