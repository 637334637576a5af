"""Tolerances that follow the dtype and the size of a reduction, so that one test passes on every CPU.

Two float32 computations of the same sum, taken in different orders (another SIMD width, another blocking of a
matrix product, a running float32 total against a float64 one), differ by up to about ``n * eps`` of the sum's
magnitude for ``n`` terms (the classic worst-case bound of recursive summation). A float64 default tolerance
(``rtol=1e-7``) applied to a float32 sum therefore passes on the CPU it was written on and fails on the next one.
"""

from __future__ import annotations

import torch


def reduction_tol(n: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """``rtol``/``atol`` for two results of an ``n``-term reduction in ``dtype`` taken in different orders.

    Args:
        n: number of terms summed (the reduction's length, at least 1).
        dtype: the dtype the terms were summed in.

    Returns:
        Keyword arguments for ``torch.testing.assert_close`` (and, as ``rel``/``abs``, for ``pytest.approx``).
    """
    eps = torch.finfo(dtype).eps
    return {"rtol": max(n, 2) * eps, "atol": max(n, 2) * eps * 1e-3}
