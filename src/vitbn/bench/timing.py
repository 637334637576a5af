"""Timing the way the field trusts: warm-up first, device-synchronized wall clock, repeats interleaved across
the compared implementations (A, B, C, A, B, C, ...) so that a noisy, shared machine slows all of them alike,
medians rather than means, and the dense matrix-product peak measured in the same rounds."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vitbn.engine.timing import synchronize


@dataclass
class Case:
    """One thing to time: ``run()`` does one iteration (a training step, a forward pass) on ``images`` images.

    After ``interleave`` ran, ``seconds`` holds the per-iteration time of every repeat and ``iters`` the
    iterations per repeat. A case whose set-up or warm-up failed carries ``error`` and is not timed.
    """

    name: str
    run: Callable[[], object]
    images: int
    device: torch.device
    iters: int = 1
    seconds: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def samples(self) -> list[float]:
        """Images per second of every repeat."""
        return [self.images / s for s in self.seconds]

    @property
    def img_s(self) -> float:
        """The median images per second over the repeats (NaN if not timed)."""
        return statistics.median(self.samples) if self.seconds else math.nan


def time_iters(case: Case, iters: int) -> float:
    """Seconds per iteration of ``iters`` back-to-back iterations, synchronized before and after."""
    synchronize(case.device)
    start = time.perf_counter()
    for _ in range(iters):
        case.run()
    synchronize(case.device)
    return (time.perf_counter() - start) / iters


def warm_up(case: Case, iters: int, min_repeat_s: float) -> None:
    """Runs ``iters`` untimed iterations (at least one: compilation, allocator growth and caches happen here),
    then sets ``case.iters`` so that one timed repeat lasts about ``min_repeat_s``."""
    for _ in range(max(1, iters)):
        case.run()
    per_iter = time_iters(case, 1)
    case.iters = max(1, math.ceil(min_repeat_s / max(per_iter, 1e-9)))


def interleave(cases: Sequence[Case], repeats: int) -> None:
    """Times ``repeats`` rounds; every round times each (warmed-up, error-free) case once, in order."""
    live = [c for c in cases if c.error is None]
    for _ in range(repeats):
        for case in live:
            case.seconds.append(time_iters(case, case.iters))


def paired_ratio(a: Case, b: Case) -> float:
    """The median over rounds of ``img/s(a) / img/s(b)``: each round's pair ran back to back, so the ratio
    is steadier than the ratio of the two medians when the machine's load drifts."""
    pairs = list(zip(a.samples, b.samples))
    return statistics.median(x / y for x, y in pairs) if pairs else math.nan


def matmul_case(dtype: torch.dtype, device: torch.device, size: int = 2048) -> Case:
    """A ``size`` x ``size`` by ``size`` x ``size`` product in ``dtype``: the dense matrix-product peak.

    ``images`` is set to the product's FLOPs / 1e9, so ``case.img_s`` reads as GFLOP/s.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    name = f"matmul {size}^3 {str(dtype).removeprefix('torch.')}"
    return Case(name, lambda: torch.mm(a, b), images=2 * size**3 / 1e9, device=device)


def summarize(samples: Sequence[float]) -> dict:
    """Median, min and max of repeat samples, and the spread (max - min) / median in percent."""
    if not samples:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "spread_pct": math.nan}
    med = statistics.median(samples)
    return {
        "median": med,
        "min": min(samples),
        "max": max(samples),
        "spread_pct": 100.0 * (max(samples) - min(samples)) / med if med else math.nan,
    }


def add_round_arguments(parser, repeats: int = 7) -> None:
    """The options of a side-by-side script (``benchmarks/*.py``): ``--repeats``, ``--min-repeat-s``, ``--threads``
    and ``--device``."""
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved timed rounds")
    parser.add_argument("--min-repeat-s", type=float, default=0.5, help="seconds one timed repeat lasts at least")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def run_rounds(cases: Sequence[Case], args, warmup: int = 3) -> None:
    """Warms every case up and times them in ``args.repeats`` interleaved rounds (``add_round_arguments``)."""
    for case in cases:
        warm_up(case, warmup, args.min_repeat_s)
    interleave(list(cases), args.repeats)
