"""What the benchmark runs on (CPU model and instruction sets, or the GPU), and the process-wide CPU settings.

``tune_cpu_allocator`` (in ``vitbn.runtime``, re-exported here) keeps glibc from handing freed activation buffers
back to the kernel; what it buys on the machine at hand is measured by ``benchmarks/cpu_runtime.py`` and the
figures live in docs/bench.
"""

from __future__ import annotations

import os
import platform
import resource

import torch

from vitbn.runtime import tune_cpu_allocator

__all__ = ["tune_cpu_allocator", "cpu_features", "cpu_flags", "cpu_model", "device_name", "environment", "native_bf16"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# (flag in /proc/cpuinfo, the name a reader knows), widest last: what decides which ATen and oneDNN kernels run
ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"),
             ("amx_int8", "AMX-INT8"), ("avx512_fp16", "AVX512-FP16"))  # fmt: skip


def cpu_features(flags: set[str] | None = None) -> str:
    """The vector and matrix instruction sets of the CPU that decide its kernels, e.g. ``"AVX2 AVX-512 AVX512-BF16
    AMX-BF16"``; ``"no AVX2"`` on an older or non-x86 CPU."""
    flags = cpu_flags() if flags is None else flags
    names = [name for flag, name in ISA_FLAGS if flag in flags]
    return " ".join(names) if names else "no AVX2"


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether bf16 matrix products run in hardware: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or
    AMX-BF16 (elsewhere oneDNN falls back to a slow emulation; docs/bench has the measured figures)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return True


def device_name(device: torch.device) -> str:
    """A human-readable name of the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()} [{cpu_features()}] ({os.cpu_count()} logical cores visible)"
    return device.type


def page_faults() -> int:
    """Minor page faults of this process so far (each one a kernel entry that zeroes a fresh page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def environment(device: torch.device) -> dict:
    """The facts a reader needs to compare two benchmark runs."""
    from vitbn.provenance import source_commit

    commit, dirty = source_commit()
    return {
        "commit": commit[:7] + ("+changes" if dirty else ""),
        "cpu_features": cpu_features() if device.type == "cpu" else None,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(device),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
