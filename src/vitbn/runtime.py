"""The CPU runtime of a training or inference process: threads, OpenMP waiting and the C allocator.

Three process-wide choices decide how a small ViT runs on a CPU, and PyTorch's defaults for them assume a machine
that nothing else uses:

- **Threads.** PyTorch starts one thread per physical core. When another process keeps a core busy, every
  parallel region waits for the thread that shares its core, and a spinning OpenMP thread takes time from the very
  process it waits for: the default can run several times slower than one thread. ``choose_threads`` looks at the
  machine before the run (the idle share of the cores this process may use, sampled from ``/proc/stat``) and takes
  one thread per idle core; ``--threads N`` (or ``OMP_NUM_THREADS``) overrides it.
- **OpenMP waiting.** libgomp (the OpenMP runtime of PyTorch's Linux wheels) spins a long time at the end of a
  parallel region before it sleeps. ``openmp_defaults`` sets a short spin (``GOMP_SPINCOUNT``) unless the user set
  ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: back-to-back operators still find their threads awake, and a thread
  whose core is wanted by another process gives it back soon. libgomp reads these variables once, when it is
  loaded, so this must run before ``torch`` is imported (the ``vitbn`` command does it first thing).
- **The allocator.** glibc returns a freed block above its mmap threshold to the kernel, and the next training
  step page-faults it in again, zeroed page by page; ``tune_cpu_allocator`` keeps freed memory in the heap.

``benchmarks/cpu_runtime.py`` measures each of these choices on the machine at hand (quiet and beside a busy
process); docs/bench/cpu-runtime.md has the figures and the machine they were measured on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

# A short spin: long enough to bridge the gap between two operators of one step, short enough that a waiting thread
# yields its core soon. libgomp's own default is 300000 spins (1000 when it runs more threads than CPUs).
SPINCOUNT = "10000"
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1
_IDLE_MARGIN = 0.25  # a core counts as idle when at least 75% of it was idle over the sample


def openmp_defaults(environ: dict | None = None) -> dict[str, str]:
    """Sets ``GOMP_SPINCOUNT`` (see the module docstring) in ``environ`` (default ``os.environ``) unless the user chose
    a wait policy or a spin count. Returns what it set. Effective only before the OpenMP runtime is loaded."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return {"GOMP_SPINCOUNT": SPINCOUNT}


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), or ``range(os.cpu_count())`` where there is none."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """``{cpu: (idle, total)}`` jiffies per CPU from ``/proc/stat`` (idle includes iowait)."""
    out = {}
    with open(path) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (values[3] + values[4], sum(values))
    return out


def idle_cpus(cpus: list[int], seconds: float = 0.2, path: str = "/proc/stat") -> float | None:
    """How many of ``cpus`` were idle over ``seconds`` (a fraction per CPU, summed); None where ``/proc/stat`` is
    not readable (not Linux)."""
    try:
        before = _cpu_times(path)
        time.sleep(seconds)
        after = _cpu_times(path)
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            d_idle, d_total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
            idle += d_idle / d_total if d_total > 0 else 1.0
    return idle


def choose_threads(requested: int | None, *, default: int, idle: float | None) -> tuple[int, str]:
    """The number of threads to run with, and why (logged with the run).

    Args:
        requested: the user's ``--threads`` (wins when given).
        default: PyTorch's own choice (one per physical core), the most this picks.
        idle: idle cores measured just before the run (``idle_cpus``), None if unknown.
    """
    if requested:
        return requested, "requested"
    if "OMP_NUM_THREADS" in os.environ:
        return default, "OMP_NUM_THREADS"
    if idle is None:
        return default, "default (load unknown)"
    threads = max(1, min(default, int(idle + _IDLE_MARGIN)))
    return threads, f"{idle:.2f} of {len(usable_cpus())} cores idle"


def configure_threads(requested: int | None) -> tuple[int, str]:
    """Chooses the threads (``choose_threads`` on this machine's load now) and sets them in torch."""
    import torch

    if requested:
        threads, why = requested, "requested"
    else:
        default = torch.get_num_threads()
        threads, why = choose_threads(None, default=default, idle=None if default == 1 else idle_cpus(usable_cpus()))
    torch.set_num_threads(threads)
    return threads, why


def tune_cpu_allocator(environ: dict | None = None) -> bool:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel: no mmap-ed blocks (every
    block comes from the heap, which is reused) and a 2 GiB trim threshold (the heap is not shrunk). The environment
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` does the same for a process from its start.
    Process-wide; the price is that the process keeps its peak heap until it exits.

    ``VITBN_ALLOCATOR=system`` in ``environ`` (default ``os.environ``) leaves the allocator as it is: the
    benchmark's baseline, and a way out for a machine where the kept heap costs too much memory.

    Returns:
        True if both settings were accepted (glibc on Linux), False elsewhere or when opted out.
    """
    environ = os.environ if environ is None else environ
    if environ.get("VITBN_ALLOCATOR") == "system" or not sys.platform.startswith("linux"):
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
