"""What the benchmark runs on, and the one process-wide setting that makes CPU training faster.

``tune_cpu_allocator`` keeps glibc from handing freed activation buffers back to the kernel. By default a
buffer above the (dynamic, at most 32 MiB) mmap threshold is ``munmap``-ed when freed and page-faulted in
again, page by page and zeroed by the kernel, when the next step allocates it; the heap's top is trimmed
likewise. Counted with ``getrusage`` on the study's ViT (batch 100, 2-core AMD EPYC): a bf16 training step
took ~8700 page faults, ~600 with the allocator tuned (wall time 152 -> 117 ms per step, one thread, loaded
machine); an fp32 inference batch of 1000 took ~200 faults per image and 1.5x longer than tuned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import resource
import sys

import torch

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1


def tune_cpu_allocator() -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel: no mmap-ed blocks
    (every block comes from the heap, which is reused) and a 2 GiB trim threshold (the heap is not shrunk).
    The environment ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` does the same for a process from
    its start. Process-wide; the price is that the process keeps its peak heap until it exits.

    Returns:
        True if both settings were accepted (glibc on Linux), False elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


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


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether bf16 matrix products run in hardware: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or
    AMX-BF16 (elsewhere oneDNN falls back to a reference kernel, measured ~7x slower than fp32 on an AVX2 EPYC)."""
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
        return f"{cpu_model()} ({os.cpu_count()} logical cores visible)"
    return device.type


def page_faults() -> int:
    """Minor page faults of this process so far (each one a kernel entry that zeroes a fresh page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def environment(device: torch.device) -> dict:
    """The facts a reader needs to compare two benchmark runs."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(device),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
