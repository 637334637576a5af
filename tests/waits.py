"""Hard waits in the tests, scaled by one factor from the environment: ``VITBN_TEST_TIME_FACTOR`` (default 1).

A hard wait is an upper bound on something that ends by itself (a torchrun job, a server that starts answering, a
checkpoint that appears): a passing test never sits through it, so raising the factor on a slow or loaded machine
(CI, a laptop on battery) costs nothing and turns a spurious timeout into a pass.
"""

from __future__ import annotations

import os

ENV = "VITBN_TEST_TIME_FACTOR"


def time_factor() -> float:
    """The factor from ``$VITBN_TEST_TIME_FACTOR``; a ValueError names the bad value."""
    raw = os.environ.get(ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # NaN too
        raise ValueError(f"{ENV}={raw!r} must be a number > 0 (e.g. 3 on a slow machine)")
    return value


def wait_s(seconds: float) -> float:
    """``seconds`` times the factor: the bound for one hard wait."""
    return seconds * time_factor()
