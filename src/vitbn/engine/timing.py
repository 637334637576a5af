"""Wall-clock timing of device work: ``time.perf_counter()`` bracketed by device synchronization."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Waits for queued kernels, so that wall-clock timings measure the work."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """``with Stopwatch(device) as sw: ...`` then ``sw.seconds``; synchronizes on entry and exit so that
    kernels queued before are not counted and kernels queued inside are."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
